"""Text embeddings from a GLM model (docs/knowledge.md, "Embeddings").

    vectors = embed(model, params, ["布达拉宫建在哪里？", "Which planet has rings?"], tokenizer=tok)  # [2, hidden]

The final normed hidden states of the decoder (GLMForCausalLM(..., return_hidden=True)), pooled per text:
"last" takes the last token's state (a causal model's summary of the whole text; the usual choice for decoder
embedders, with an end-of-text token appended), "mean" averages the real tokens. Vectors are L2-normalised
unless `normalize=False`, so that a dot product is the cosine similarity. Texts are right-padded into batches
whose length is a compile bucket (generation.bucket_length) and whose row count is a power of two up to
`batch_size`: one compiled program per such shape.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.checkpoints import default_tokenizer, load_checkpoint, tokenizer_or_shipped
from glm_jax.generation import bucket_length
from glm_jax.model import GLMForCausalLM
from glm_jax.model.layers.pooling import POOLINGS, pool

@functools.partial(jax.jit, static_argnames=("model", "pooling", "normalize"))
def _embed_batch(model, params, ids, mask, *, pooling: str, normalize: bool):
    hidden = model.apply({"params": params}, ids, segment_ids=mask.astype(jnp.int32), return_hidden=True)
    return pool(hidden, mask, pooling, normalize)


def embed(model, params, texts: Sequence[str] | Sequence[Sequence[int]], *, tokenizer=None, pooling: str = "last",
          normalize: bool = True, batch_size: int = 32, max_len: int = 512) -> np.ndarray:
    """[len(texts), hidden] float32 embeddings of `texts` (strings with `tokenizer`, or lists of token ids)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: {pooling!r} is not one of {POOLINGS}")
    if texts and isinstance(texts[0], str):
        if tokenizer is None:
            raise ValueError("embed: texts given as strings need a tokenizer")
        ids = [tokenizer.embedding_ids(text, max_len) for text in texts]
    else:
        ids = [list(t)[:max_len] for t in texts]
    out = np.zeros((len(ids), model.cfg.hidden_size), np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a bucket
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = bucket_length(max(len(ids[i]) for i in rows))
        height = min(batch_size, 1 << (len(rows) - 1).bit_length())  # rows: a power of two up to batch_size
        batch = np.zeros((height, width), np.int32)
        mask = np.zeros((height, width), np.int32)
        for r, i in enumerate(rows):
            batch[r, :len(ids[i])], mask[r, :len(ids[i])] = ids[i], 1
        mask[len(rows):, 0] = 1  # filler rows: one token, dropped below
        vectors = _embed_batch(model, params, jnp.asarray(batch), jnp.asarray(mask), pooling=pooling,
                               normalize=normalize)
        out[rows] = np.asarray(vectors)[:len(rows)]
    return out


@dataclasses.dataclass
class Embedder:
    """A GLM model that embeds texts for dense retrieval: `embedder(texts) -> [n, hidden]` (`embed` with its
    options). `checkpoint` is where it was loaded from; an index records it and loads it back."""

    model: GLMForCausalLM
    params: Any
    tokenizer: Any
    pooling: str = "last"
    max_len: int = 512
    checkpoint: str | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, *, tokenizer: str | Path | None = None, pooling: str = "last",
             max_len: int = 512) -> "Embedder":
        """From any checkpoint glm_jax loads (THUDM, transformers, a train.py run); its tokenizer unless given."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: {pooling!r} is not one of {POOLINGS}")
        cfg, params = load_checkpoint(checkpoint)
        tok = tokenizer_or_shipped(tokenizer or default_tokenizer(checkpoint))
        return cls(GLMForCausalLM(cfg), params, tok, pooling, max_len, str(checkpoint))

    @property
    def dim(self) -> int:
        """The width of the vectors: the model's hidden size."""
        return self.model.cfg.hidden_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return embed(self.model, self.params, list(texts), tokenizer=self.tokenizer, pooling=self.pooling,
                     max_len=self.max_len)
