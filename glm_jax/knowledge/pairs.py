"""Training pairs for an embedder from a knowledge base alone (docs/knowledge.md, "Training an embedder"): the
inverse cloze task (Lee, Chang and Toutanova, 2019): a sentence of a passage is the query, the passage without
that sentence (headings first) the positive; the other pairs of a batch are the negatives.

    write_cloze_pairs(read_passages("data/knowledge/docs"), "pairs.jsonl", per_passage=3, seed=0)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from glm_jax.knowledge.documents import Passage, _sentences


def cloze_pairs(passages: Sequence[Passage], *, per_passage: int = 3, seed: int = 0) -> list[dict]:
    """Up to `per_passage` {"query", "positive"} records per passage with at least two sentences, shuffled."""
    rng = random.Random(seed)
    out = []
    for p in passages:
        sentences = _sentences(p.text)
        if len(sentences) < 2:
            continue
        for i in rng.sample(range(len(sentences)), min(per_passage, len(sentences))):
            rest = " ".join([*p.headings, *(s for j, s in enumerate(sentences) if j != i)])
            out.append({"query": sentences[i].strip(), "positive": rest})
    rng.shuffle(out)
    return out


def write_cloze_pairs(passages: Sequence[Passage], out: str | Path, *, per_passage: int = 3, seed: int = 0) -> int:
    pairs = cloze_pairs(passages, per_passage=per_passage, seed=seed)
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")
    return len(pairs)
