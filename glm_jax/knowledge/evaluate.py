"""Recall@k of an index on a question set (docs/knowledge.md, "Measured"): a question is answered at k when a
passage from its `source` file under its `title` heading is among the first k hits.

    questions = read_questions("data/knowledge/questions.jsonl")   # {"question", "source", "title"} per line
    recall(index, questions, ks=(1, 5))                             # {"recall@1": ..., "recall@5": ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from glm_jax.knowledge.documents import Passage


def read_questions(path: str | Path) -> list[dict]:
    """A question set: {"question", "source", "title"} per line (the passage that answers it)."""
    return read_records(path, ("question", "source", "title"), "a question")


def read_records(path: str | Path, fields: Sequence[str], what: str = "a record") -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped), each with string `fields`; ValueError naming the
    file and line of a bad one."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in fields):
                names = ", ".join(f"'{k}'" for k in fields[:-1]) + f" and '{fields[-1]}'"
                raise ValueError(f"{path}:{n}: {what} needs string {names} fields")
            out.append(obj)
    return out


def answers(passage: Passage, question: dict) -> bool:
    return passage.source == question["source"] and passage.title == question["title"]


def recall(index, questions: Sequence[dict], ks: Sequence[int] = (1, 5),
           search: Callable | None = None) -> dict[str, float]:
    """{"recall@k": fraction of questions answered within the first k hits, for each k; "mrr@K": the mean over
    the questions of 1 / the rank of the first answering hit (0 beyond the largest k, K)}. `search(query, k)`
    defaults to `index.search`."""
    search = search or index.search
    found, reciprocal = {k: 0 for k in ks}, 0.0
    for q in questions:
        hits = search(q["question"], max(ks))
        first = next((h.rank for h in hits if answers(h.passage, q)), None)
        reciprocal += 1.0 / first if first else 0.0
        for k in ks:
            found[k] += first is not None and first <= k
    n = max(len(questions), 1)
    return {**{f"recall@{k}": found[k] / n for k in ks}, f"mrr@{max(ks)}": reciprocal / n}
