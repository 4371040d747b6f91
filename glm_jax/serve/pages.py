"""The page pool's bookkeeping on the host: who holds which page, and which full pages hold which prefix.

Pages are numbered 1 .. num_pages - 1 (page 0 is the null page the model writes padding into). A page is free,
held (reference count > 0: by every running request whose page table lists it), or cached: no longer held
but still holding a full page of a known prefix, kept until its space is needed (least recently used first).
A full page is known by the hash of its tokens and of every token before it (a chain: page k's key is
sha256(key of page k-1 + its tokens)), so a hit always means the same whole prefix (docs/serving.md).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

ROOT = b"glm_jax prefix"


def page_keys(tokens: Sequence[int], page_size: int, count: int, parent: bytes = ROOT) -> list[bytes]:
    """The chained keys of the first `count` full pages of `tokens`."""
    keys = []
    for k in range(count):
        chunk = np.asarray(tokens[k * page_size:(k + 1) * page_size], np.int64).tobytes()
        parent = hashlib.sha256(parent + chunk).digest()
        keys.append(parent)
    return keys


class PagePool:
    """Reference-counted pages with a prefix cache. `stats`: prefix-cache queries and hits in tokens."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.refs = np.zeros(num_pages, np.int32)
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # evictable, LRU first
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.stats = {"query_tokens": 0, "hit_tokens": 0}

    # ------------------------------------------------------------------ counts
    @property
    def available(self) -> int:
        """Pages a request can get now (free or evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        """Pages held by running requests."""
        return int((self.refs > 0).sum())

    # ------------------------------------------------------------------ holding
    def allocate(self) -> int | None:
        """A page for new tokens (refcount 1), evicting the least recently used cached page if none is free;
        None when every page is held."""
        if self.free:
            page = self.free.popleft()
        elif self.cached:
            page, _ = self.cached.popitem(last=False)
            del self.by_key[self.key_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page; a page nobody holds is cached if it has a key, else freed."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.cached[page] = None
                else:
                    self.free.append(page)

    # ------------------------------------------------------------------ prefixes
    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest run of `keys` from the start, now held by the caller."""
        pages = []
        if self.prefix_caching:
            for key in keys:
                page = self.by_key.get(key)
                if page is None:
                    break
                pages.append(page)
        for page in pages:
            if self.refs[page] == 0:
                self.cached.pop(page, None)
            self.refs[page] += 1
        self.stats["query_tokens"] += len(keys) * self.page_size
        self.stats["hit_tokens"] += len(pages) * self.page_size
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Records that `page` (held, full) holds the prefix `key`; the first page to hold a prefix keeps it."""
        if self.prefix_caching and key not in self.by_key and page not in self.key_of:
            self.by_key[key] = page
            self.key_of[page] = key
