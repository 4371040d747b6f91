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
import math
from typing import Iterable, Sequence

import numpy as np

KINDS = ("token", "sentence", "document")
# THUDM/GLM's pretraining scripts (config/ds_block_10B.sh, ds_block_large_chinese.sh): --bert-prob 0.4,
# --gap-sentence-prob 0.3, the rest left-to-right generation; --avg-block-length 3; --gpt-min-ratio 0.25.
GLM_MIX = {"token": 0.4, "sentence": 0.3, "document": 0.3}
MASK_RATIO = 0.15  # the paper: spans are sampled until at least 15% of the tokens are masked
MEAN_SPAN = 3.0  # span lengths ~ Poisson(3) (the paper, section 2.1; --avg-block-length 3)
DOCUMENT_MIN_RATIO = 0.5  # the paper's document-level span: 50%-100% of the document (the scripts use 0.25)
# A token ends a sentence when its text holds one of these (THUDM/GLM blocklm_utils.py, contains_sentence_end)
SENTENCE_END_CHARS = (".", "?", "!", ";", ":", "\u3002", "\uff1f", "\uff01", "\uff1b", "\u2026", "\n")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The token ids of GLM's special tokens (ChatGLM-6B's tokenizer: [MASK], [gMASK], [sMASK], <sop>, <eop>)."""

    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    end: int | None = None  # </s>: closes Part A unless it ends with a mask (`assemble`)

    def mask_for(self, kind: str) -> int:
        return {"token": self.mask, "sentence": self.smask, "document": self.gmask}[kind]

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        """The ids in `tokenizer`'s vocabulary; ValueError naming the tokens it lacks."""
        names = {"mask": "[MASK]", "gmask": "[gMASK]", "smask": "[sMASK]", "sop": "<sop>", "eop": "<eop>"}
        have = tokenizer.special_tokens
        missing = [t for t in names.values() if t not in have]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} (blank infilling needs ChatGLM-6B's "
                             f"vocabulary: ice_text.model)")
        return cls(**{field: have[token] for field, token in names.items()}, end=have.get("</s>"))


def sentence_end_ids(tokenizer) -> frozenset[int]:
    """The ids whose text holds a sentence end (SENTENCE_END_CHARS; <n> decodes to a newline)."""
    return frozenset(i for i in range(tokenizer.vocab_size)
                     if any(c in tokenizer.decode([i]) for c in SENTENCE_END_CHARS))


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
    order; `mask_id` replaces each span in Part A. With `special.end`, Part A ends with it unless its last token
    is a mask: the frame ChatGLM-6B's tokenizer gives a text (THUDM's build_inputs_with_special_tokens: text,
    </s> unless the text ends with [MASK] / [gMASK], then <sop>), so that `tokenizer.encode(corrupted text)` is
    Part A + <sop>."""
    tokens = list(tokens)
    part_a, mask_at, cursor = [], [], 0
    for start, end in spans:
        part_a += tokens[cursor:start]
        mask_at.append(len(part_a))
        part_a.append(mask_id)
        cursor = end
    part_a += tokens[cursor:]
    if special.end is not None and part_a[-1] != mask_id:
        part_a.append(special.end)
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


def pack(examples: Iterable[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Examples packed whole, in order, into rows of `seq_len` tokens (a row is closed when the next example does
    not fit; the rest is padding). Per row: input_ids, position_ids, block_position_ids, targets, loss_mask, and
    for attention segment_ids (the example's 1-based number in its row, 0 for padding) and context_ends (the row
    index where the token's Part A ends): query i sees key j when they share a segment and j < context_ends[i] or
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
    names = ("input_ids", "position_ids", "block_position_ids", "targets", "segment_ids", "context_ends")
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
            out["context_ends"][r, span] = start + ex.context_length
            start = span.stop
    return out


def packed_attention_mask(segment_ids: np.ndarray, context_ends: np.ndarray) -> np.ndarray:
    """[..., S, S] bool from `pack`'s segment_ids and context_ends (padding sees nothing and is seen by nothing)."""
    j = np.arange(segment_ids.shape[-1])
    same = (segment_ids[..., :, None] == segment_ids[..., None, :]) & (segment_ids[..., :, None] > 0)
    return same & ((j[None, :] < context_ends[..., :, None]) | (j[None, :] <= j[:, None]))


def longest_piece(seq_len: int, ratio: float = MASK_RATIO) -> int:
    """The longest text piece whose example surely fits `seq_len`: an example is at most n + 2k + 1 tokens for
    k spans (a mask in Part A and a <sop> in Part B per span, the </s> closing Part A), and k <= ceil(ratio * n)
    since every span covers a token (one span for a document-level corruption)."""
    return max(2, int((seq_len - 3) // (1 + 2 * ratio)))


def pieces(document: Sequence[int], longest: int) -> list[Sequence[int]]:
    """The document cut into the fewest pieces of at most `longest` tokens, of near-equal lengths (no short
    remainder); pieces under 2 tokens are left out (nothing to infill)."""
    count = max(1, math.ceil(len(document) / longest))
    bounds = np.linspace(0, len(document), count + 1).round().astype(int)
    return [document[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= 2]


@dataclasses.dataclass
class Corruptor:
    """Documents -> GLM examples with corruption kinds drawn from `mix` (one draw per text piece; the
    pretraining scripts draw one kind per batch), texts cut to fit rows of `seq_len`, `copies` differently
    corrupted passes over the documents (each pass new spans, as a fresh epoch would draw). `counts` tallies
    the examples per kind and the tokens masked out of all."""

    special: SpecialIds
    seq_len: int
    sentence_ends: frozenset = frozenset()
    mix: dict = dataclasses.field(default_factory=lambda: dict(GLM_MIX))
    ratio: float = MASK_RATIO
    mean_span: float = MEAN_SPAN
    document_min_ratio: float = DOCUMENT_MIN_RATIO
    copies: int = 1
    counts: dict = dataclasses.field(default_factory=dict)

    def examples(self, documents: Sequence[Sequence[int]], rng: np.random.Generator) -> Iterable[Example]:
        longest = longest_piece(self.seq_len, self.ratio)
        self.counts = {**{k: 0 for k in KINDS}, "tokens": 0, "masked": 0}
        for _ in range(self.copies):
            for document in documents:
                for piece in pieces(document, longest):
                    kind = choose_kind(rng, self.mix)
                    ex = blank_infilling(piece, rng, special=self.special, kind=kind,
                                         sentence_ends=self.sentence_ends, ratio=self.ratio,
                                         mean_span=self.mean_span, document_min_ratio=self.document_min_ratio)
                    self.counts[kind] += 1
                    self.counts["tokens"] += len(piece)
                    self.counts["masked"] += sum(end - start for start, end in ex.spans)
                    yield ex

    def rows(self, documents: Sequence[Sequence[int]], rng: np.random.Generator, pad_id: int) -> dict[str, np.ndarray]:
        """`pack`ed rows of every example."""
        return pack(self.examples(documents, rng), self.seq_len, pad_id)


# ------------------------------------------------------------------------------------------------ cloze

def verbalizer_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each label word's token ids as they stand inside a text (a leading piece that decodes to nothing but
    whitespace, SentencePiece's dummy prefix before a word that has no piece of its own, is dropped).
    ValueError naming a word that gives no token or two words that give the same ids."""
    out = []
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
            ids = ids[1:]
        if not ids:
            raise ValueError(f"the label word {word!r} has no tokens")
        if ids in out:
            raise ValueError(f"the label words {words[out.index(ids)]!r} and {word!r} are the same tokens {ids}")
        out.append(ids)
    return out


def cloze_rows(tokenizer, text: str, pattern: str, candidates: Sequence[Sequence[int]],
               seq_len: int) -> dict[str, np.ndarray]:
    """GLM's cloze form of a classification example (Du et al., section 2.3, "NLU tasks as cloze questions"):
    `pattern` with the text at "{text}" and a "[MASK]" the label word fills, framed as the tokenizer frames a
    prompt (`prompt_end`: ... </s> <sop>); one row per candidate: the prompt, then the candidate's tokens but
    its last, predicting the candidate's tokens from the <sop> on: the prompt is `tokenizer.encode(pattern with
    the text)`, as a user prompts the model, unless the longest candidate would then not fit `seq_len`; the
    text's tokens are then cut. Returns input_ids, segment_ids, targets [C, seq_len] int32 and target_mask [C, seq_len]
    float32 (1 where a candidate token is predicted)."""
    room = seq_len - 2 - (max(map(len, candidates)) - 1)  # </s> and <sop> close the prompt
    body = tokenizer.encode(pattern.replace("{text}", text), add_special_tokens=False)
    if len(body) > room:  # too long: the text's tokens are cut, the pattern's kept
        before, after = pattern.split("{text}")
        head = tokenizer.encode(before, add_special_tokens=False) if before else []
        tail = tokenizer.encode(after, add_special_tokens=False) if after else []
        if room - len(head) - len(tail) < 1:
            raise ValueError(f"the pattern and the longest label word leave no room for the text in {seq_len} "
                             f"tokens")
        body = head + tokenizer.encode(text, add_special_tokens=False)[:room - len(head) - len(tail)] + tail
    prompt = tokenizer.prompt_end(body)
    names = ("input_ids", "segment_ids", "targets")
    out = {name: np.zeros((len(candidates), seq_len), np.int32) for name in names}
    out["input_ids"][:] = tokenizer.pad_token_id or 0
    out["target_mask"] = np.zeros((len(candidates), seq_len), np.float32)
    for c, word in enumerate(candidates):
        ids = prompt + list(word[:-1])
        out["input_ids"][c, :len(ids)] = ids
        out["segment_ids"][c, :len(ids)] = 1
        start = len(prompt) - 1  # the <sop> predicts the word's first token
        out["targets"][c, start:start + len(word)] = word
        out["target_mask"][c, start:start + len(word)] = 1
    return out
