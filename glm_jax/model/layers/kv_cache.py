"""Where a decode step writes new keys and reads the keys it attends over: one cache, two layouts (docs/serving.md).

* Contiguous (`generate`, `stream_generate`, chat): every buffer is [L, batch, max_len, ...] and the index is the
  scalar write slot shared by all rows (left padding aligns them). A row reads its own [max_len, ...] line.
* Paged (the serving engine): every buffer is a pool [L, num_pages, page_size, ...] shared by all requests and
  the index is a `PagedIndex`: each row's page table and where its new tokens go. A row reads its pages gathered
  into a [max_pages * page_size, ...] view, logical position j at page j // page_size, offset j % page_size.

A recurrent state (glm5_next's KDA layers) has a fixed size per sequence: contiguous, a buffer [L, batch, ...]; paged,
a pool [L, num_slots, ...] with one row per decode slot, which `read_state` / `write_state` reach through the
index's `slots`.

The attention modules (GQA keys and values, MLA's latent, DSA's indexer keys) call `write`, `read`, `place` and
`query_offset` and never look at the layout, so every cache a model has is paged the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class PagedIndex:
    """A paged decode call's index. `pages` [B, max_pages]: each row's page table (page 0 is the null page, never
    handed out: unused entries and padding point there). `offset` [B]: the logical position of query slot 0; the
    call's S query slots are positions offset .. offset + S - 1, the last `new` [B] of them real tokens (rows are
    left padded), so a row's keys after the call are positions 0 .. offset + S - 1."""

    pages: jax.Array
    offset: jax.Array
    new: jax.Array
    slots: jax.Array | None = None  # [B] each row's decode slot: its row of a recurrent-state pool
    # ChatGLM-6B (2D positions): [B] each row's context end (its first <sop>, or its prompt length) and mask
    # position (its first [gMASK], else [MASK]; -1 for none), logical positions of the row's sequence
    context_len: jax.Array | None = None
    mask_position: jax.Array | None = None

    def fresh(self, seq: int):
        """[B] bool: rows whose first real token is position 0 (a new or recomputed sequence: zero state)."""
        return self.offset + seq - self.new == 0

    def query_valid(self, seq: int):
        """[B, S] bool: the real (not padding) query slots."""
        return jnp.arange(seq)[None, :] >= (seq - self.new)[:, None]

    def positions(self, seq: int):
        """[B, S] logical positions of the query slots (padding clipped to 0)."""
        return jnp.maximum(self.offset[:, None] + jnp.arange(seq)[None, :], 0).astype(jnp.int32)

    def key_segments(self, page_size: int, seq: int):
        """[B, T] int32: 1 on each row's keys (after this call's writes), 0 past them; T = max_pages * page_size."""
        t = self.pages.shape[1] * page_size
        return (jnp.arange(t)[None, :] < (self.offset + seq)[:, None]).astype(jnp.int32)


def is_paged(index) -> bool:
    return isinstance(index, PagedIndex)


def write(buffer, layer, index, new):
    """`buffer` with `new` [B, S, ...] written for `layer` at the call's positions."""
    new = new.astype(buffer.dtype)
    if not is_paged(index):
        return jax.lax.dynamic_update_slice(buffer, new[None], (layer, 0, index) + (0,) * (buffer.ndim - 3))
    b, s = new.shape[:2]
    page_size = buffer.shape[2]
    pos = index.offset[:, None] + jnp.arange(s)[None, :]
    valid = index.query_valid(s)
    page = jnp.take_along_axis(index.pages, jnp.clip(pos // page_size, 0, index.pages.shape[1] - 1), axis=1)
    page = jnp.where(valid, page, 0)  # padding writes into the null page
    return buffer.at[layer, page.reshape(-1), (pos % page_size).reshape(-1)].set(new.reshape(b * s, *new.shape[2:]))


def read(buffer, layer, index):
    """[B, T, ...]: each row's keys of `layer` by logical position."""
    if not is_paged(index):
        return jax.lax.dynamic_index_in_dim(buffer, layer, 0, keepdims=False)
    gathered = buffer[layer, index.pages]  # [B, max_pages, page_size, ...], one gather: no copy of the layer's pool
    return gathered.reshape(gathered.shape[0], -1, *gathered.shape[3:])


def place(view, index, new):
    """A read view [B, T, ...] with `new` [B, S, ...] at the call's positions (for keys computed after the read)."""
    new = new.astype(view.dtype)
    if not is_paged(index):
        return jax.lax.dynamic_update_slice(view, new, (0, index) + (0,) * (view.ndim - 2))
    s = new.shape[1]
    pos = jnp.where(index.query_valid(s), index.offset[:, None] + jnp.arange(s)[None, :], view.shape[1])
    return view.at[jnp.arange(view.shape[0])[:, None], pos].set(new, mode="drop")


def query_offset(index):
    """The position of query slot 0 in the read view: the write slot, or [B] per row (paged)."""
    return index.offset if is_paged(index) else index


def view_length(buffer, index) -> int:
    """T, the length of a read view."""
    return index.pages.shape[1] * buffer.shape[2] if is_paged(index) else buffer.shape[2]


def read_state(buffer, layer, index, seq: int):
    """One layer's recurrent state [B, ...] (KDA's state and convolution inputs) from a per-row buffer [L, B, ...]
    (contiguous) or, paged, from the slot pool [L, num_slots, ...] at each row's slot, zero for a fresh row."""
    rows = jax.lax.dynamic_index_in_dim(buffer, layer, 0, keepdims=False)
    if not is_paged(index):
        return rows
    if index.slots is None:
        raise ValueError("PagedIndex.slots: a recurrent state (KDA) is kept per decode slot; give each row's slot")
    state = rows[index.slots]
    return jnp.where(index.fresh(seq).reshape((-1,) + (1,) * (state.ndim - 1)), jnp.zeros_like(state), state)


def write_state(buffer, layer, index, value):
    """`buffer` with layer `layer`'s state replaced by `value` [B, ...]; paged, at each row's slot, and rows without
    a real token (bucket padding) write nothing."""
    value = value.astype(buffer.dtype)
    if not is_paged(index):
        return jax.lax.dynamic_update_index_in_dim(buffer, value, layer, 0)
    slots = jnp.where(index.new > 0, index.slots, buffer.shape[1])  # out of range: dropped
    return buffer.at[layer, slots].set(value, mode="drop")
