"""GLM's autoregressive blank infilling (Du et al., "GLM: General Language Model Pretraining with Autoregressive
Blank Infilling", ACL 2022): one document's token ids -> the input of a model with 2D positions (ChatGLM-6B's
layout). docs/glm-objective.md describes the objective; the names here follow it.

    rng = np.random.default_rng(0)
    example = blank_infilling(tokens, rng, special=special, kind="token")   # or "sentence", "document"
    example.input_ids, example.position_ids, example.block_position_ids, example.targets, example.loss_mask
    example.context_length                                                  # Part A's length: the attention prefix

Part A is the document with every sampled span replaced by one mask token ([MASK] for token spans, [sMASK] for
sentences, [gMASK] for the document-level span at the end). Part B holds the spans in a random order, each as
<sop> + its tokens, predicting its tokens + <eop>. Position ids: a Part A token its index in Part A; every token
of a span the index of its mask token. Block position ids: 0 in Part A; 1, 2, ... through each span from its
<sop>. Attention: Part A tokens see all of Part A; a Part B token sees Part A and Part B up to itself. The loss is
on Part B's targets only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

KINDS = ("token", "sentence", "document")
# THUDM/GLM's pretraining scripts (config/ds_block_10B.sh, ds_block_large_chinese.sh): --bert-prob 0.4,
# --gap-sentence-prob 0.3, the rest left-to-right generation; --avg-block-length 3; --gpt-min-ratio 0.25.
GLM_MIX = {"token": 0.4, "sentence": 0.3, "document": 0.3}
MASK_RATIO = 0.15  # the paper: spans are sampled until at least 15% of the tokens are masked
MEAN_SPAN = 3.0  # span lengths ~ Poisson(3) (the paper, section 2.1; --avg-block-length 3)
DOCUMENT_MIN_RATIO = 0.5  # the paper's document-level span: 50%-100% of the document (the scripts use 0.25)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The token ids of GLM's special tokens (ChatGLM-6B's tokenizer: [MASK], [gMASK], [sMASK], <sop>, <eop>)."""

    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int

    def mask_for(self, kind: str) -> int:
        return {"token": self.mask, "sentence": self.smask, "document": self.gmask}[kind]


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # [n] Part A then Part B
    position_ids: np.ndarray  # [n]
    block_position_ids: np.ndarray  # [n]
    targets: np.ndarray  # [n] the next token of each Part B input (0 in Part A)
    loss_mask: np.ndarray  # [n] float32: 1 on Part B
    context_length: int  # Part A's length
    spans: tuple[tuple[int, int], ...]  # [start, end) in the document, in document order
    order: tuple[int, ...]  # Part B's order: indices into `spans`

    def attention_mask(self) -> np.ndarray:
        """[n, n] bool: query i may attend to key j (Part A bidirectional, Part B causal)."""
        n = len(self.input_ids)
        j = np.arange(n)
        return (j[None, :] < self.context_length) | (j[None, :] <= j[:, None])


def assemble(tokens: Sequence[int], spans: Sequence[tuple[int, int]], order: Sequence[int], mask_id: int,
             special: SpecialIds) -> Example:
    """The example for given spans ([start, end) in document order, not overlapping, not touching) and Part B
    order; `mask_id` replaces each span in Part A."""
    tokens = list(tokens)
    part_a, mask_at, cursor = [], [], 0
    for start, end in spans:
        part_a += tokens[cursor:start]
        mask_at.append(len(part_a))
        part_a.append(mask_id)
        cursor = end
    part_a += tokens[cursor:]
    inputs, targets, positions, blocks = list(part_a), [0] * len(part_a), list(range(len(part_a))), [0] * len(part_a)
    for k in order:
        start, end = spans[k]
        span = tokens[start:end]
        inputs += [special.sop] + span
        targets += span + [special.eop]
        positions += [mask_at[k]] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    loss = np.zeros(len(inputs), np.float32)
    loss[len(part_a):] = 1
    return Example(np.asarray(inputs, np.int32), np.asarray(positions, np.int32), np.asarray(blocks, np.int32),
                   np.asarray(targets, np.int32), loss, len(part_a), tuple(map(tuple, spans)), tuple(order))


def token_spans(n: int, rng: np.random.Generator, ratio: float = MASK_RATIO,
                mean_span: float = MEAN_SPAN) -> list[tuple[int, int]]:
    """Spans of Poisson(mean_span) lengths (at least 1) drawn until they cover at least `ratio` of the n
    tokens, placed at random with at least one unmasked token between two spans."""
    lengths: list[int] = []
    while sum(lengths) < ratio * n:
        lengths.append(max(1, int(rng.poisson(mean_span))))
    while sum(lengths) + len(lengths) - 1 > n - 1 and len(lengths) > 1:  # too many for a short text
        lengths.pop()
    lengths[0] = min(lengths[0], n - 1)
    free = n - sum(lengths) - (len(lengths) - 1)  # unmasked tokens beyond the one between two spans
    gaps = rng.multinomial(free, np.ones(len(lengths) + 1) / (len(lengths) + 1))  # before, between, after
    spans, cursor = [], 0
    for i, length in enumerate(lengths):
        cursor += gaps[i] + (1 if i else 0)
        spans.append((cursor, cursor + length))
        cursor += length
    return spans


def sentence_spans(tokens: Sequence[int], sentence_ends: set[int], rng: np.random.Generator,
                   ratio: float = MASK_RATIO) -> list[tuple[int, int]]:
    """Whole sentences (each ending after a token of `sentence_ends`, or at the end) drawn at random until they
    cover at least `ratio` of the tokens, never two adjacent ones; sorted."""
    bounds, start = [], 0
    for i, t in enumerate(tokens):
        if t in sentence_ends:
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        bounds.append((start, len(tokens)))
    chosen: set[int] = set()
    covered = 0
    for i in rng.permutation(len(bounds)):
        if covered >= ratio * len(tokens):
            break
        if i - 1 in chosen or i + 1 in chosen or len(chosen) + 1 == len(bounds):
            continue
        chosen.add(int(i))
        covered += bounds[i][1] - bounds[i][0]
    return [bounds[i] for i in sorted(chosen)]


def document_span(n: int, rng: np.random.Generator, min_ratio: float = DOCUMENT_MIN_RATIO) -> list[tuple[int, int]]:
    """One span at the end whose length is uniform over [min_ratio, 1) of the n tokens (at least one token stays
    in Part A as context)."""
    length = int(rng.integers(max(1, int(np.ceil(min_ratio * n))), n))
    return [(n - length, n)]


def blank_infilling(tokens: Sequence[int], rng: np.random.Generator, *, special: SpecialIds, kind: str = "token",
                    sentence_ends: set[int] = frozenset(), ratio: float = MASK_RATIO, mean_span: float = MEAN_SPAN,
                    document_min_ratio: float = DOCUMENT_MIN_RATIO) -> Example:
    """One document (at least 2 tokens) corrupted by spans of `kind`: "token" ([MASK], Poisson spans),
    "sentence" ([sMASK], whole sentences; a text of one sentence falls back to token spans) or "document"
    ([gMASK], one span at the end). Part B's order is a random permutation of the spans."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    if len(tokens) < 2:
        raise ValueError(f"blank infilling needs a document of at least 2 tokens, got {len(tokens)}")
    if kind == "document":
        spans = document_span(len(tokens), rng, document_min_ratio)
    elif kind == "sentence":
        spans = sentence_spans(tokens, set(sentence_ends), rng, ratio) or token_spans(len(tokens), rng, ratio,
                                                                                     mean_span)
    else:
        spans = token_spans(len(tokens), rng, ratio, mean_span)
    order = [int(i) for i in rng.permutation(len(spans))]
    return assemble(tokens, spans, order, special.mask_for(kind), special)


def choose_kind(rng: np.random.Generator, mix: dict[str, float] = GLM_MIX) -> str:
    """A corruption kind drawn with the probabilities of `mix` (normalised)."""
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = np.asarray([mix[k] for k in kinds], np.float64)
    return kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Examples packed whole, in order, into rows of `seq_len` tokens (a row is closed when the next example does
    not fit; the rest is padding). Per row: input_ids, position_ids, block_position_ids, targets, loss_mask, and
    for attention segment_ids (the example's 1-based number in its row, 0 for padding) and prefix_end (the row
    index where the token's Part A ends): query i sees key j when they share a segment and j < prefix_end[i] or
    j <= i, which is each example's own mask, examples never seeing each other. An example longer than seq_len is
    a ValueError."""
    rows: list[list[Example]] = []
    used = seq_len
    for ex in examples:
        if len(ex.input_ids) > seq_len:
            raise ValueError(f"an example of {len(ex.input_ids)} tokens does not fit rows of {seq_len}")
        if used + len(ex.input_ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.input_ids)
    names = ("input_ids", "position_ids", "block_position_ids", "targets", "segment_ids", "prefix_end")
    out = {name: np.zeros((len(rows), seq_len), np.int32) for name in names}
    out["input_ids"][:] = pad_id
    out["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row, 1):
            span = slice(start, start + len(ex.input_ids))
            for name in ("input_ids", "position_ids", "block_position_ids", "targets", "loss_mask"):
                out[name][r, span] = getattr(ex, name)
            out["segment_ids"][r, span] = s
            out["prefix_end"][r, span] = start + ex.context_length
            start = span.stop
    return out


def packed_attention_mask(segment_ids: np.ndarray, prefix_end: np.ndarray) -> np.ndarray:
    """[..., S, S] bool from `pack`'s segment_ids and prefix_end (padding sees nothing and is seen by nothing)."""
    j = np.arange(segment_ids.shape[-1])
    same = (segment_ids[..., :, None] == segment_ids[..., None, :]) & (segment_ids[..., :, None] > 0)
    return same & ((j[None, :] < prefix_end[..., :, None]) | (j[None, :] <= j[:, None]))
