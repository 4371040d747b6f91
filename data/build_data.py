"""Regenerate every derived data file from data/corpus/, deterministically.

    python data/build_data.py          # rewrite the files below
    python data/build_data.py --check  # exit 1 if any committed file differs from a rebuild

Outputs:
    glm_jax/assets/tokenizer.model        SentencePiece BPE model trained on the corpus
    glm_jax/assets/chatglm6b/ice_text.model  a ChatGLM-6B-style vocabulary (its special pieces) on the corpus,
                                          with tokenizer_config.json (no image-token offset)
    data/sft/{train,eval}.jsonl           ChatGLM3 conversations built from the corpus
    data/classification/{train,eval}.jsonl  {"text", "label"}: 0 = prose, 1 = poetry
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

DATA = Path(__file__).resolve().parent
CORPUS = DATA / "corpus"
TOKENIZER = DATA.parent / "glm_jax" / "assets" / "tokenizer.model"
ICE_TEXT = DATA.parent / "glm_jax" / "assets" / "chatglm6b" / "ice_text.model"

VOCAB_SIZE = 8000
SEED = 20240601

# Book genres for the classification task (Isaiah, prophetic verse and prose mixed, is left out).
POETRY = ["Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"]
PROSE = ["Genesis", "Ruth", "Esther", "Jonah", "Matthew", "Mark", "Luke", "John", "Acts"]

TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
LOOKUP_TOOL = {
    "name": "lookup_verse",
    "description": "Look up one Bible verse by reference, in English (ASV) or Chinese (CUV).",
    "parameters": {
        "type": "object",
        "properties": {
            "book": {"type": "string", "description": "English book name, e.g. John"},
            "chapter": {"type": "integer"},
            "verse": {"type": "integer"},
            "language": {"type": "string", "enum": ["en", "zh"]},
        },
        "required": ["book", "chapter", "verse"],
    },
}


@dataclass(frozen=True)
class Verse:
    book: str  # as written in its own file: "Genesis" or "创世纪"
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def read_verses(name: str) -> list[Verse]:
    verses = []
    for line in (CORPUS / name).read_text(encoding="utf-8").splitlines():
        book, chapter, verse, text = re.fullmatch(r"(.+?) (\d+):(\d+) (.*)", line).groups()
        verses.append(Verse(book, int(chapter), int(verse), text))
    return verses


def read_python_docs() -> list[tuple[str, str]]:
    """(section title, first prose paragraph) of each help() topic that has one.

    A title is the line above a row of '*'. Prose: unindented lines (code and grammar
    blocks are indented) that end with a full stop, longer than a version note.
    """
    lines = (CORPUS / "python_docs_en.txt").read_text(encoding="utf-8").splitlines()
    starts = [i - 1 for i in range(1, len(lines))
              if lines[i] and set(lines[i]) == {"*"} and len(lines[i]) == len(lines[i - 1])]
    sections = []
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        body = "\n".join(lines[start + 2:end])
        for paragraph in body.split("\n\n"):
            rows = paragraph.strip("\n").splitlines()
            if rows and not any(row[:1].isspace() for row in rows) and rows[-1].endswith(".") \
                    and len(paragraph) > 80:
                # Re-join the hard-wrapped lines, undoing hyphen breaks.
                text = rows[0]
                for row in rows[1:]:
                    text += row if text.endswith("-") else " " + row
                sections.append((lines[start], text))
                break
    return sections


# ---------------------------------------------------------------------- tokenizer

def train_tokenizer() -> bytes:
    """SentencePiece BPE model bytes, trained on every non-empty corpus line in file order.

    Settings follow ChatGLM3's model: <unk>=0 (also pad), <s>=1, </s>=2, byte fallback,
    split digits, whitespace kept as is and no Unicode normalisation (so full-width
    Chinese punctuation survives a round trip). One thread and in-memory input keep the
    bytes reproducible (a file input would store its path in the model).
    """
    lines = []
    for path in sorted(CORPUS.glob("*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type="bpe", vocab_size=VOCAB_SIZE, character_coverage=0.9995,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        input_sentence_size=0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def train_ice_text() -> bytes:
    """A SentencePiece model built the way THUDM's ice_text.model is (ChatGLM-6B): the text is first rewritten
    into <n> / <|tab|> / <|blank_N|> pieces, and those and GLM's special tokens are user-defined pieces, in
    ice_text's order ([MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>); NFKC normalisation as
    ice_text. The vocabulary train.py's blank-infilling objective uses when no tokenizer is given."""
    sys.path.insert(0, str(DATA.parent))
    from glm_jax.tokenizers.chatglm6b import MAX_BLANK, SPECIAL_TOKENS, ChatGLM6BTokenizer

    pieces = (["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)] + list(SPECIAL_TOKENS)
              + ["<pad>"])
    lines = []
    for path in sorted(CORPUS.glob("*.txt")):
        lines += [ChatGLM6BTokenizer.preprocess(line) for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB_SIZE, character_coverage=0.9995,
        user_defined_symbols=pieces, byte_fallback=True, input_sentence_size=0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


# ---------------------------------------------------------------------- SFT

def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def build_sft(rng: random.Random, zh: list[Verse], en: list[Verse], docs: list[tuple[str, str]]) -> list[dict]:
    en_by_key = {(v.book, v.chapter, v.verse): v for v in en}
    book_map = dict(zip(dict.fromkeys(v.book for v in zh), dict.fromkeys(v.book for v in en)))
    # Verse-parallel pairs (the two translations split a few verses differently).
    pairs = [(z, en_by_key[key]) for z in zh if (key := (book_map[z.book], z.chapter, z.verse)) in en_by_key]
    next_of = {(p[0].book, p[0].chapter, p[0].verse): p for p in pairs}

    def following(pair):
        z = pair[0]
        return next_of.get((z.book, z.chapter, z.verse + 1))

    samples = []
    for z, e in rng.sample(pairs, 20):
        samples.append([user(f"{z.ref} 是怎么说的？"), assistant(z.text)])
        samples.append([user(f"What does {e.ref} say?"), assistant(e.text)])
    for z, e in rng.sample(pairs, 15):
        samples.append([user(f"Translate into Chinese: {e.text}"), assistant(z.text)])
        samples.append([user(f"把这节经文翻译成英文：{z.text}"), assistant(e.text)])
    for z, e in rng.sample(pairs, 10):
        samples.append([user(f"这节经文出自哪里？{z.text}"), assistant(f"出自{z.ref}。")])
        samples.append([user(f"Where is this verse from? {e.text}"), assistant(f"It is {e.ref}.")])
    with_next = [p for p in pairs if following(p)]
    for i, pair in enumerate(rng.sample(with_next, 20)):
        (z, e), (z2, e2) = pair, following(pair)
        if i % 2:
            samples.append([user(f"{z.ref} 是怎么说的？"), assistant(z.text),
                            user("下一节呢？"), assistant(z2.text)])
        else:
            samples.append([{"role": "system", "content": "You quote the American Standard Version exactly."},
                            user(f"What does {e.ref} say?"), assistant(e.text),
                            user("And the next verse?"), assistant(e2.text)])
    for title, paragraph in rng.sample(docs, 20):
        question = f"Quote the first prose paragraph of the Python documentation section \u201c{title}\u201d."
        samples.append([user(question), assistant(paragraph)])
    for i, (z, e) in enumerate(rng.sample(pairs, 16)):
        chinese = i % 2 == 0
        verse = z if chinese else e
        call = {"book": e.book, "chapter": e.chapter, "verse": e.verse, "language": "zh" if chinese else "en"}
        samples.append([
            {"role": "system", "content": TOOL_SYSTEM, "tools": [LOOKUP_TOOL]},
            user(f"请帮我查一下{z.ref}。" if chinese else f"Please look up {e.ref} for me."),
            {"role": "assistant", "metadata": "lookup_verse", "content": _tool_call_block(call)},
            {"role": "observation", "content": json.dumps({"reference": verse.ref, "text": verse.text},
                                                          ensure_ascii=False)},
            assistant(f"{z.ref} 说：“{z.text}”" if chinese else f"{e.ref} reads: \u201c{e.text}\u201d"),
        ])
    for z, _ in rng.sample(pairs, 4):
        code = f"print(len({z.text!r}))"
        samples.append([
            user(f"用 Python 数一数这节经文有多少个字符：{z.text}"),
            {"role": "assistant", "metadata": "interpreter", "content": f"```python\n{code}\n```"},
            {"role": "observation", "content": str(len(z.text))},
            assistant(f"这节经文共有 {len(z.text)} 个字符（包括标点）。"),
        ])
    rng.shuffle(samples)
    return [{"conversations": conversation} for conversation in samples]


def _tool_call_block(parameters: dict) -> str:
    # Same text as glm_jax.tokenizers.sentencepiece.format_tool_call; kept here so the data build does not
    # import the package it ships files into.
    args = ", ".join(f"{k}={v!r}" for k, v in parameters.items())
    return f"```python\ntool_call({args})\n```"


# ---------------------------------------------------------------------- classification

def build_classification(rng: random.Random, zh: list[Verse], en: list[Verse]) -> tuple[list[dict], list[dict]]:
    """Two consecutive verses of one chapter, without the reference (it would give the answer away)."""
    book_map = dict(zip(dict.fromkeys(v.book for v in en), dict.fromkeys(v.book for v in zh)))
    train, evaluation = [], []
    for verses, books in ((en, lambda b: b), (zh, lambda b: book_map[b])):
        for label, names in ((0, PROSE), (1, POETRY)):
            wanted = {books(name) for name in names}
            windows = [f"{a.text} {b.text}" for a, b in zip(verses, verses[1:])
                       if a.book in wanted and (a.book, a.chapter) == (b.book, b.chapter)]
            chosen = [{"text": text, "label": label} for text in rng.sample(windows, 100)]
            train += chosen[:75]
            evaluation += chosen[75:]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


# ---------------------------------------------------------------------- main

def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def build_all() -> dict[Path, bytes]:
    zh, en = read_verses("bible_cuv_zh.txt"), read_verses("bible_asv_en.txt")
    rng = random.Random(SEED)
    sft = build_sft(rng, zh, en, read_python_docs())
    n_eval = len(sft) // 10
    cls_train, cls_eval = build_classification(rng, zh, en)
    return {
        TOKENIZER: train_tokenizer(),
        ICE_TEXT: train_ice_text(),
        ICE_TEXT.parent / "tokenizer_config.json": b'{"num_image_tokens": 0}\n',
        DATA / "sft" / "train.jsonl": jsonl(sft[n_eval:]),
        DATA / "sft" / "eval.jsonl": jsonl(sft[:n_eval]),
        DATA / "classification" / "train.jsonl": jsonl(cls_train),
        DATA / "classification" / "eval.jsonl": jsonl(cls_eval),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args()
    outputs = build_all()
    if args.check:
        stale = [p for p, data in outputs.items() if not p.is_file() or p.read_bytes() != data]
        for path in stale:
            print(f"out of date: {path.relative_to(DATA.parent)}", file=sys.stderr)
        return 1 if stale else 0
    for path, data in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path.relative_to(DATA.parent)} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
