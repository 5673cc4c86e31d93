"""Content-addressed chunk keys: a prefix-chained BLAKE2b hash of token ids under a KV namespace.

Chunk i of a sequence is keyed by ``h_i = BLAKE2b-256(h_{i-1} || int64-LE(tokens of chunk i))``
with ``h_{-1}`` the digest of the namespace and the request's extra key. So a key names the whole
prefix up to the end of its chunk, is the same in every process and on every host (no Python
``hash()``, no ``PYTHONHASHSEED``), and differs whenever the model, KV dtype, layout, page size,
chunk size, TP rank/size or the request's cache salt / LoRA key differ: KV is never reused across
models or tenants by mistake.

Partial last chunk: only whole chunks get keys and are stored. A trailing partial chunk would be
keyed by a prefix that the next request extending it never asks for again (its own key covers
more tokens), so storing it would fill the tiers with single-use entries; the tail costs at most
``chunk_tokens - 1`` tokens of recompute, and while the prefix is on the GPU the radix tree
serves it anyway.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

KEY_BYTES = 32
_VERSION = b"kvtier-chunk-v1"

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
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(_VERSION + canonical, digest_size=KEY_BYTES).digest()

    def chunk_keys(self, token_ids: Sequence[int], extra_key: Optional[str] = None) -> list[ChunkKey]:
        """Keys of the whole chunks of ``token_ids``; a trailing partial chunk gets none."""
        tokens = np.asarray(token_ids, dtype="<i8")
        seed = hashlib.blake2b(self.digest(), digest_size=KEY_BYTES)
        # Length-prefix the extra key so that None, "" and any string hash apart.
        if extra_key is not None:
            raw = extra_key.encode()
            seed.update(len(raw).to_bytes(8, "little") + raw)
        prev = seed.digest()
        keys = []
        for start in range(0, len(tokens) - self.chunk_tokens + 1, self.chunk_tokens):
            h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
            h.update(tokens[start : start + self.chunk_tokens].tobytes())
            prev = h.digest()
            keys.append(prev)
        return keys
