"""Knowledge fusion: the passages retrieved for a question put into the chat prompt, and their sources returned
with the reply (docs/knowledge.md, "Grounded chat").

    hits = index.search(question, k=3)
    turn = grounded_messages(tokenizer, question, hits)   # the messages of this turn: knowledge, then the question
    tokenizer.apply_chat_template(history + turn)

The passages go in as a system message just before the question, numbered [1], [2], ... each with where it came
from, and worded in the question's language (Chinese when it holds Han characters); every GLM chat format from
ChatGLM3 on has a system role that may appear mid-conversation. ChatGLM2's format has none: there they open the
user's own message, as the ChatGLM LangChain demos did. A question with no hit is sent as it is. Where the
prompt would not leave room for the reply, the worst hits are left out (`fitted_messages`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from glm_jax.knowledge.evaluate import read_records

_HAN = re.compile(r"[\u4e00-\u9fff]")
HEADERS = {
    "zh": ("参考资料：", "请依据参考资料回答问题，并用 [编号] 注明出处；资料中没有答案时，请如实说明。"),
    "en": ("Reference passages:", "Answer from the reference passages, citing them as [n]; if they do not hold the "
                                  "answer, say so."),
}


def knowledge_text(question: str, hits: Sequence) -> str:
    """The numbered passages with their sources, between the header and the instruction."""
    header, instruction = HEADERS["zh" if _HAN.search(question) else "en"]
    blocks = [f"[{h.rank}] {h.passage.citation}\n{h.passage.text}" for h in hits]
    return "\n\n".join([header, *blocks, instruction])


def has_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat format can put a system message before a user message."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False)
    except ValueError:
        return False
    return True


def grounded_messages(tokenizer, question: str, hits: Sequence, *, system_role: bool | None = None
                      ) -> list[dict[str, Any]]:
    """The OpenAI messages of one grounded user turn: [knowledge as a system message, the question], or the
    question alone when there are no hits; with no system role in the format (`system_role`, default
    `has_system_role(tokenizer)`) one user message holding the knowledge and then the question."""
    if not hits:
        return [{"role": "user", "content": question}]
    knowledge = knowledge_text(question, hits)
    if system_role is None:
        system_role = has_system_role(tokenizer)
    if system_role:
        return [{"role": "system", "content": knowledge}, {"role": "user", "content": question}]
    return [{"role": "user", "content": f"{knowledge}\n\n{question}"}]


def fitted_messages(tokenizer, question: str, hits: Sequence, render, budget: int | None, *,
                    system_role: bool | None = None) -> tuple[list[dict[str, Any]], list]:
    """(`grounded_messages` with as many of the best hits as keep the prompt within `budget` tokens, those hits):
    `render(turn)` is the prompt ids with this turn; the worst hits are left out first, down to none."""
    for n in range(len(hits), 0, -1):
        turn = grounded_messages(tokenizer, question, hits[:n], system_role=system_role)
        if budget is None or len(render(turn)) <= budget:
            return turn, list(hits[:n])
    return grounded_messages(tokenizer, question, (), system_role=system_role), []


def sources(hits: Sequence) -> list[dict[str, Any]]:
    """The hits as returned with a reply: rank (the [n] of the prompt), score, text, source, headings, location."""
    return [h.to_json() for h in hits]


def grounded_sft_record(index, tokenizer, question: str, answer: str, *, k: int = 3, mode: str | None = None,
                        system_role: bool | None = None) -> dict[str, Any]:
    """One SFT record (train.py `data.task: sft`, OpenAI `messages`) that teaches answering from retrieved
    passages: the question grounded exactly as `ChatSession(knowledge=index)` grounds it at inference, then the
    answer; "sources" (ignored by training) lists the passages."""
    hits = index.search(question, k=k, mode=mode)
    turn = grounded_messages(tokenizer, question, hits, system_role=system_role)
    return {"messages": [*turn, {"role": "assistant", "content": answer}], "sources": sources(hits)}


def read_qa(path) -> list[dict[str, str]]:
    """A JSONL file of {"question", "answer"} records; ValueError naming the file and line of a bad one."""
    return read_records(path, ("question", "answer"))
