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
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            obj = json.loads(line)
            if not all(isinstance(obj.get(k), str) for k in ("question", "source", "title")):
                raise ValueError(f"{path}:{n}: a question needs string 'question', 'source' and 'title' fields")
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
