"""Content-addressed chunk keys: a prefix-chained BLAKE2b hash of token ids under a KV namespace.

Chunk i of a sequence is keyed by ``h_i = BLAKE2b-256(h_{i-1} || int64-LE(tokens of chunk i))``
with ``h_{-1}`` the digest of the namespace and the request's extra key. So a key names the whole
prefix up to the end of its chunk, is the same in every process and on every host (no Python
``hash()``, no ``PYTHONHASHSEED``), and differs whenever the model, KV dtype, layout, page size,
chunk size, TP rank/size or the request's cache salt / LoRA key differ: KV is never reused across
models or tenants by mistake.

Partial last chunk (a *tail*): the tokens after a sequence's last whole chunk, cut to a multiple of
``TAIL_GRANULE`` tokens (and of the page size), are keyed ``BLAKE2b-256(h_last || int64-LE(tail))``
under a separate personalization, so no tail key equals a chunk key. A request continuing the
sequence (a chat turn: the previous prompt and answer, then a new message) asks for a tail by
trying each granule length after the last whole chunk it found, longest first (``tail_keys``):
without it, up to ``chunk_tokens - 1`` tokens of every turn were recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

KEY_BYTES = 32
_VERSION = b"kvtier-chunk-v1"
_TAIL = b"kvtier-tail"  # BLAKE2b personalization of tail keys
TAIL_GRANULE = 16
"""Tails are stored and looked up in multiples of this many tokens: a lookup hashes at most
``chunk_tokens / TAIL_GRANULE`` candidate lengths (16 for 256-token chunks, ~0.04 ms), and at most
15 tokens of a continued sequence are recomputed."""

ChunkKey = bytes
"""A 32-byte digest; ``key.hex()`` is its printable form."""


@dataclass(frozen=True)
class KVNamespace:
    """What must match for stored KV bytes to be valid for a reader."""

    model: str
    """Model identity: path or name plus anything that changes weights (revision, quantization)."""
    kv_dtype: str
    """Storage dtype of the KV pool, e.g. ``bfloat16`` or ``float8_e4m3fn``."""
    layout: str
    """Pool layout, e.g. ``mha-nhd:L32:H8:D128:V128``; see ``layout_of`` in the tree hook."""
    page_size: int
    tp_rank: int
    tp_size: int
    chunk_tokens: int

    def digest(self) -> bytes:
        return _digest(self)

    @property
    def tail_granule(self) -> int:
        """Tail lengths are multiples of this (``TAIL_GRANULE`` and the page size)."""
        return math.lcm(TAIL_GRANULE, self.page_size)

    def chunk_keys(
        self, token_ids: Sequence[int], extra_key: Optional[str] = None, known: Sequence[ChunkKey] = ()
    ) -> list[ChunkKey]:
        """Keys of the whole chunks of ``token_ids``; a trailing partial chunk gets none. ``known``:
        the keys of its first chunks, computed before (e.g. for a prefix), which are not hashed again."""
        tokens = np.asarray(token_ids, dtype="<i8")
        prev = known[-1] if known else _seed(self, extra_key)
        keys = list(known)
        for start in range(len(known) * self.chunk_tokens, len(tokens) - self.chunk_tokens + 1, self.chunk_tokens):
            h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
            h.update(tokens[start : start + self.chunk_tokens].tobytes())
            prev = h.digest()
            keys.append(prev)
        return keys

    def tail_keys(
        self, token_ids: Sequence[int], keys: Sequence[ChunkKey], extra_key: Optional[str] = None
    ) -> list[ChunkKey]:
        """Keys of the tails after the leading whole chunks of ``token_ids`` that have ``keys`` (from
        ``chunk_keys``, all of them or a prefix): element ``j`` names the first ``(j + 1) *
        tail_granule`` tokens after them, up to ``chunk_tokens - 1`` tokens."""
        g, start = self.tail_granule, len(keys) * self.chunk_tokens
        tail = np.asarray(token_ids[start : start + self.chunk_tokens - 1], dtype="<i8")
        if len(tail) < g:
            return []
        h = hashlib.blake2b(keys[-1] if keys else _seed(self, extra_key), digest_size=KEY_BYTES, person=_TAIL)
        out = []
        for end in range(g, len(tail) + 1, g):
            h.update(tail[end - g : end].tobytes())
            out.append(h.copy().digest())
        return out


# Kept: each chunk_keys call starts from a seed, and the radix hook makes several per request on
# SGLang's scheduler thread (the namespace's JSON and two hashes took ~0.1 ms a call there).
@functools.lru_cache(maxsize=64)
def _digest(namespace: KVNamespace) -> bytes:
    canonical = json.dumps(asdict(namespace), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(_VERSION + canonical, digest_size=KEY_BYTES).digest()


@functools.lru_cache(maxsize=1024)
def _seed(namespace: KVNamespace, extra_key: Optional[str]) -> bytes:
    seed = hashlib.blake2b(_digest(namespace), digest_size=KEY_BYTES)
    # Length-prefix the extra key so that None, "" and any string hash apart.
    if extra_key is not None:
        raw = extra_key.encode()
        seed.update(len(raw).to_bytes(8, "little") + raw)
    return seed.digest()
