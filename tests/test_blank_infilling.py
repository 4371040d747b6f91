"""GLM's blank infilling (glm_jax/train/blank_infilling.py) against the paper's definition (Du et al., ACL 2022,
section 2.1 and figure 2), written out here by hand: Part A and the spans rebuild the document; every position
id, block position id, target and attention entry of hand-made examples is what the definition says; the masked
fraction and span lengths follow the sampling rules over many draws."""

import numpy as np
import pytest

from glm_jax.train.blank_infilling import (GLM_MIX, SpecialIds, assemble, blank_infilling, choose_kind,
                                           document_span, sentence_spans, token_spans)

S = SpecialIds(mask=1, gmask=2, smask=3, sop=4, eop=5)
M, G, SM, SOP, EOP = 1, 2, 3, 4, 5


def test_the_papers_figure_2():
    """x1..x6 with spans [x3] and [x5 x6], Part B in the order (x5 x6), (x3): Part A = x1 x2 [M] x4 [M];
    positions (1-based in the paper) 1 2 3 4 5 | 5 5 5 3 3; block positions 0 0 0 0 0 | 1 2 3 1 2; inputs of
    Part B [S] x5 x6 [S] x3 predicting x5 x6 [E] x3 [E]."""
    x = [11, 12, 13, 14, 15, 16]
    ex = assemble(x, [(2, 3), (4, 6)], [1, 0], M, S)
    assert ex.input_ids.tolist() == [11, 12, M, 14, M, SOP, 15, 16, SOP, 13]
    assert (ex.position_ids + 1).tolist() == [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert ex.block_position_ids.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert ex.targets[5:].tolist() == [15, 16, EOP, 13, EOP] and ex.loss_mask.tolist() == [0] * 5 + [1] * 5
    assert ex.context_length == 5
    # figure 2(d): Part A attends to all of Part A only; x5 (the 2nd token of Part B) to Part A and [S], x5
    want = np.zeros((10, 10), bool)
    want[:, :5] = True
    for i in range(5, 10):
        want[i, 5:i + 1] = True
    np.testing.assert_array_equal(ex.attention_mask(), want)


def test_document_level_generation_with_gmask():
    """[gMASK]: the context, the mask, then <sop> and the rest of the text, positions all at the mask, block
    positions 1, 2, ... (ChatGLM-6B's layout for generation from a prompt)."""
    x = [21, 22, 23, 24, 25]
    ex = assemble(x, [(2, 5)], [0], G, S)
    assert ex.input_ids.tolist() == [21, 22, G, SOP, 23, 24, 25]
    assert ex.position_ids.tolist() == [0, 1, 2, 2, 2, 2, 2]
    assert ex.block_position_ids.tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert ex.targets[3:].tolist() == [23, 24, 25, EOP]


def rebuild(ex) -> list[int]:
    """The document from Part A and the spans, by the definition: each mask token of Part A, left to right,
    stands for the span whose Part B tokens sit at its position."""
    n_a = ex.context_length
    a = ex.input_ids[:n_a].tolist()
    spans_at = {}
    i = n_a
    while i < len(ex.input_ids):
        assert ex.input_ids[i] == SOP and ex.block_position_ids[i] == 1
        j = i + 1
        while j < len(ex.input_ids) and ex.block_position_ids[j] > 1:
            j += 1
        spans_at[int(ex.position_ids[i])] = ex.input_ids[i + 1:j].tolist()
        assert ex.targets[i:j].tolist() == ex.input_ids[i + 1:j].tolist() + [EOP]
        i = j
    out = []
    for p, t in enumerate(a):
        out += spans_at.pop(p) if p in spans_at else [t]
    assert not spans_at
    return out


@pytest.mark.parametrize("kind", ["token", "sentence", "document"])
def test_part_a_and_the_spans_rebuild_the_document(kind):
    rng = np.random.default_rng(0)
    period = 9
    for trial in range(200):
        n = int(rng.integers(2, 120))
        doc = rng.integers(10, 100, n).tolist()
        for k in range(6, n, 7):
            doc[k] = period
        ex = blank_infilling(doc, rng, special=S, kind=kind, sentence_ends={period})
        assert rebuild(ex) == doc, (kind, trial)
        masks = [t for t in ex.input_ids[:ex.context_length] if t in (M, G, SM)]
        assert len(masks) == len(ex.spans) and len(set(masks)) == 1
        assert sorted(ex.order) == list(range(len(ex.spans)))
        assert ex.attention_mask()[ex.context_length - 1, ex.context_length - 1]
        assert not ex.attention_mask()[0, ex.context_length:].any()  # Part A never sees Part B


def test_the_masked_fraction_and_span_lengths_follow_the_sampling_rules():
    rng = np.random.default_rng(1)
    fractions, lengths = [], []
    for _ in range(2000):
        spans = token_spans(200, rng)
        covered = sum(e - s for s, e in spans)
        assert covered >= 0.15 * 200 and all(b[0] > a[1] for a, b in zip(spans, spans[1:]))  # apart, in order
        fractions.append(covered / 200)
        lengths += [e - s for s, e in spans]
    assert 0.15 <= np.mean(fractions) < 0.18  # overshoot of the last span only
    assert abs(np.mean(lengths) - 3.0) < 0.15  # Poisson(3) (zero-length draws count as 1: +0.05)
    doc = [document_span(100, rng)[0] for _ in range(2000)]
    assert all(e == 100 and 50 <= e - s < 100 for s, e in doc)
    assert abs(np.mean([e - s for s, e in doc]) - 74.5) < 1.5  # uniform over 50..99
    tokens = [10, 11, 9, 12, 13, 14, 9, 15, 9, 16, 17, 18, 19, 9]  # sentences of 3, 4, 2, 5 tokens
    for _ in range(100):
        spans = sentence_spans(tokens, {9}, rng)
        assert set(spans) <= {(0, 3), (3, 7), (7, 9), (9, 14)} and spans
        assert all(b[0] > a[1] for a, b in zip(spans, spans[1:]))  # never two adjacent sentences
    kinds = [choose_kind(rng) for _ in range(4000)]
    for kind, p in GLM_MIX.items():
        assert abs(kinds.count(kind) / 4000 - p) < 0.03


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        blank_infilling([1, 2, 3], np.random.default_rng(0), special=S, kind="word")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        blank_infilling([7], np.random.default_rng(0), special=S)


def test_packed_rows_keep_documents_apart():
    """pack(): examples whole and in order; a row's mask (from its segment ids and prefix ends) is the block
    diagonal of each example's own mask, so no example sees another; padding has no loss and sees nothing."""
    from glm_jax.train.blank_infilling import pack, packed_attention_mask

    rng = np.random.default_rng(3)
    examples = [blank_infilling(rng.integers(10, 100, int(rng.integers(4, 40))).tolist(), rng, special=S,
                                kind=choose_kind(rng), sentence_ends={9}) for _ in range(30)]
    rows = pack(examples, 64)
    masks = packed_attention_mask(rows["segment_ids"], rows["context_ends"])
    i = 0
    for r in range(len(rows["input_ids"])):
        start, segment = 0, 1
        while i < len(examples) and start + len(examples[i].input_ids) <= 64 and \
                rows["segment_ids"][r, start] == segment:
            ex, n = examples[i], len(examples[i].input_ids)
            span = slice(start, start + n)
            for name in ("input_ids", "position_ids", "block_position_ids", "targets", "loss_mask"):
                np.testing.assert_array_equal(rows[name][r, span], getattr(ex, name))
            np.testing.assert_array_equal(masks[r, span, span], ex.attention_mask())
            assert not masks[r, span, :start].any() and not masks[r, span, start + n:].any()
            start, segment, i = start + n, segment + 1, i + 1
        assert (rows["segment_ids"][r, start:] == 0).all() and (rows["loss_mask"][r, start:] == 0).all()
        assert not masks[r, start:].any()
    assert i == len(examples)
    with pytest.raises(ValueError, match="does not fit rows of 8"):
        pack(examples, 8)


def test_part_a_is_closed_by_the_end_token_unless_a_mask_ends_it():
    """With an end token (</s>), Part A is framed as ChatGLM-6B's tokenizer frames a text (THUDM's
    build_inputs_with_special_tokens: the text, </s> unless it ends with [MASK] / [gMASK], then <sop>); Part B's
    positions still point at the masks."""
    s = SpecialIds(mask=1, gmask=2, smask=3, sop=4, eop=5, end=9)
    x = [11, 12, 13, 14, 15, 16]
    ex = assemble(x, [(2, 3)], [0], M, s)
    assert ex.input_ids.tolist() == [11, 12, M, 14, 15, 16, 9, SOP, 13]
    assert ex.context_length == 7 and ex.position_ids[-2:].tolist() == [2, 2]
    ex = assemble(x, [(4, 6)], [0], M, s)  # the text ends with the mask: no </s>
    assert ex.input_ids.tolist() == [11, 12, 13, 14, M, SOP, 15, 16]
    ex = assemble(x, [(3, 6)], [0], G, s)  # document-level: Part A ends with [gMASK]
    assert ex.input_ids[:ex.context_length].tolist() == [11, 12, 13, G]
