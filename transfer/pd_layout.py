"""What a prefill and a decode server must agree on before KV moves between them, and the packing.

``PDLayout`` is the record both sides exchange when a decode rank registers with a prefill rank
(protocol version, model, KV dtype, page size, parallel sizes, KV heads, KV and metadata buffer
geometry, transport); ``compare`` says, in one sentence naming the setting to change, why two
records cannot exchange KV. Attention TP sizes may differ when one divides the other and both
divide the model's KV heads: each rank then holds a head slice (``kvtier.transfer.pd_heads``).
``data_path`` decides, per prefill/decode rank pair, between the direct path (the prefill's kernel
stores pages straight into the decode's pool, mapped by CUDA IPC) and the staged one. The rest is
the pure arithmetic of the staged data path: the pool rows of a list of pages, how a run of pages
is cut into staging slots, how the pool's buffers are grouped for
``kvtier.kernels.kv_pages.gather_kv``, and the credits that bound how many slots are in flight.
Nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from kvtier.transfer.base import PeerTimeout, TransferError

PROTO = "kvtier-pd-1"


@dataclass(frozen=True)
class PDLayout:
    """One server rank's side of the agreement; a field left None is not compared."""

    role: str
    """"prefill" or "decode": who this is, for messages."""
    address: str
    """Where it is (prefill: its bootstrap address), for messages."""
    model: Optional[str] = None
    kv_dtype: Optional[str] = None
    page_size: Optional[int] = None
    tp_size: Optional[int] = None
    tp_rank: Optional[int] = None
    """This rank's attention TP rank (which KV heads it holds); not compared."""
    total_kv_heads: Optional[int] = None
    """The model's KV heads over all TP ranks (a decode may not know it; the prefill does)."""
    pp_size: Optional[int] = None
    cp_size: Optional[int] = None
    transport: Optional[str] = None
    kv_item_lens: Optional[tuple[int, ...]] = None
    """Bytes of one page in each KV buffer (K layers, V layers, then any draft model's)."""
    aux_item_lens: Optional[tuple[int, ...]] = None
    """Bytes of one metadata row in each metadata buffer (the first-token wire schema)."""
    proto: str = PROTO

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PDLayout":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("kv_item_lens", "aux_item_lens"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


# (field, what it is called in a message, how to fix it), in the order they are checked.
_CHECKS: tuple[tuple[str, str, str], ...] = (
    ("proto", "protocol", "install the same kvtier version on both"),
    ("model", "model", "serve the same model (--model-path, --revision, --quantization, --load-format) "
     "on both, or set the kvtier key pd_model_id to the same value on both"),
    ("kv_dtype", "kv_cache_dtype", "start both with the same --kv-cache-dtype"),
    ("page_size", "page_size", "start both with the same --page-size"),
    ("tp_size", "attention tp_size", ""),
    ("pp_size", "pp_size", "start both with the same --pp-size"),
    ("cp_size", "attention cp_size", "start both with the same context-parallel size"),
    ("transport", "transport", "set the kvtier key pd_transport to the same value on both"),
)


def compare(local: PDLayout, remote: PDLayout) -> Optional[str]:
    """Why ``remote`` cannot exchange KV with ``local`` (a message for ``local``'s log), or None."""
    them = f"{remote.role} {remote.address}"
    me = f"this {local.role}"
    for name, label, fix in _CHECKS:
        a, b = getattr(local, name), getattr(remote, name)
        if a is not None and b is not None and a != b:
            if name == "tp_size":
                fix = _tp_problem(a, b, local.total_kv_heads or remote.total_kv_heads)
                if fix is None:
                    continue
            return f"kvtier PD: {them} has {label}={b}, {me} has {a}; {fix}"
    a, b = local.total_kv_heads, remote.total_kv_heads
    if a is not None and b is not None and a != b:
        return (f"kvtier PD: {them} has {b} KV heads in all, {me} has {a}; serve the same model on both")
    a, b = local.kv_item_lens, remote.kv_item_lens
    if a is not None and b is not None:
        if len(a) != len(b):
            return (
                f"kvtier PD: {them} has {len(b)} KV buffers (layers x K,V, plus a draft model's), "
                f"{me} has {len(a)}; serve the same model with the same speculative-decoding draft on both"
            )
        ta, tb = local.tp_size, remote.tp_size
        if ta is not None and tb is not None and ta != tb:
            # Each rank holds 1/tp of the heads, so the bytes of all heads must agree.
            i = next((i for i in range(len(a)) if a[i] * ta != b[i] * tb), None)
            if i is not None:
                return (
                    f"kvtier PD: {them} has {b[i]} bytes per page in KV buffer {i} at attention "
                    f"tp_size={tb}, {me} has {a[i]} at tp_size={ta} (all heads: {b[i] * tb} vs "
                    f"{a[i] * ta} bytes; head count, head dim or dtype differ); serve the same model "
                    f"with the same --kv-cache-dtype on both"
                )
        elif a != b:
            i = next(i for i in range(len(a)) if a[i] != b[i])
            return (
                f"kvtier PD: {them} has {b[i]} bytes per page in KV buffer {i}, {me} has {a[i]} "
                f"(head count, head dim or dtype per rank differ); serve the same model with the "
                f"same --tp and --kv-cache-dtype on both"
            )
    a, b = local.aux_item_lens, remote.aux_item_lens
    if a is not None and b is not None and a != b:
        return (
            f"kvtier PD: {them} has metadata rows of {list(b)} bytes, {me} has {list(a)} "
            f"(hidden size, top-logprobs or sampling-mask settings differ); start both with the "
            f"same model, speculative decoding and SGLANG_DISAGGREGATION_* settings"
        )
    return None


def _tp_problem(tp_a: int, tp_b: int, total_kv_heads: Optional[int]) -> Optional[str]:
    """How to fix TP sizes that kvtier PD cannot map onto each other, or None if it can."""
    if max(tp_a, tp_b) % min(tp_a, tp_b):
        return ("kvtier PD moves KV between attention TP sizes that divide one another; start both "
                "with such --tp sizes (for example equal ones)")
    if total_kv_heads is not None and (total_kv_heads % tp_a or total_kv_heads % tp_b):
        return (f"the model's {total_kv_heads} KV heads do not split evenly over both (a KV head "
                f"replicated on several ranks is not supported); start both with --tp sizes that divide "
                f"{total_kv_heads}")
    return None


DIRECT, STAGED = "direct", "staged"


def pool_regions(n_buffers: int) -> list[str]:
    """The transport region names under which a decode registers its KV buffers for the direct path."""
    return [f"kv{i}" for i in range(n_buffers)]


def data_path(transport: Optional[str], offer: Optional[dict[str, Any]], n_buffers: int,
              head_slice: bool) -> tuple[str, str]:
    """(``DIRECT`` or ``STAGED``, why) for a prefill rank sending to a decode rank.

    ``offer`` is the ``direct`` field of the decode's registration: ``{"regions": [names]}`` when it
    registered its KV buffers with its transport, ``{"error": why}`` when it could not, None when it
    does not offer them (an older kvtier, or a transport that cannot map memory). ``head_slice``:
    the ranks have different TP sizes, so a head slice moves. The direct path needs cuda_ipc, whole
    pages, and every KV buffer offered; whether the GPUs reach each other is the caller's check.
    """
    if transport != "cuda_ipc":
        return STAGED, f"transport {transport} cannot map the decode's pool"
    if head_slice:
        return STAGED, "the TP sizes differ, so a head slice moves through staging"
    if not offer:
        return STAGED, "the decode did not offer its KV pool"
    if offer.get("error"):
        return STAGED, f"the decode could not export its KV pool: {offer['error']}"
    regions = offer.get("regions")
    if list(regions or ()) != pool_regions(n_buffers):
        return STAGED, (f"the decode offered regions {regions}, not its {n_buffers} KV buffers "
                        f"{pool_regions(n_buffers)[:2]}...")
    return DIRECT, "pages go straight into the decode's pool over CUDA IPC"


def pages_outside(pages: np.ndarray, n_pages: int) -> Optional[str]:
    """Why ``pages`` are not all page ids of a pool of ``n_pages`` pages, or None if they are."""
    if not len(pages):
        return None
    low, high = int(np.min(pages)), int(np.max(pages))
    if low < 0 or high >= n_pages:
        return f"pages [{low}, {high}] outside a pool of {n_pages} pages"
    return None


def page_rows(pages: np.ndarray, page_size: int) -> np.ndarray:
    """The pool rows (token slots) of ``pages``, page after page: int64 ``[len(pages) * page_size]``."""
    pages = np.asarray(pages, dtype=np.int64)
    return (pages[:, None] * page_size + np.arange(page_size, dtype=np.int64)).reshape(-1)


def slot_bytes_for(wanted_bytes: int, page_bytes: int) -> int:
    """A staging slot size holding whole pages: ``wanted_bytes`` rounded down, at least one page."""
    if page_bytes <= 0:
        raise ValueError(f"page_bytes must be > 0, got {page_bytes}")
    return max(1, wanted_bytes // page_bytes) * page_bytes


def slot_chunks(n_pages: int, pages_per_slot: int) -> list[tuple[int, int]]:
    """(first page, page count) of each staging slot's share of ``n_pages`` pages, in order."""
    if pages_per_slot <= 0:
        raise ValueError(f"pages_per_slot must be > 0, got {pages_per_slot}")
    return [(s, min(pages_per_slot, n_pages - s)) for s in range(0, n_pages, pages_per_slot)]


def kv_groups(item_lens: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split the pool's KV buffers into (K-like, V-like) index lists that ``gather_kv`` accepts.

    Each list holds buffers of one page size and both lists are equally long. The packing only has
    to be the same on both sides (their ``kv_item_lens`` are equal), so SGLang's order, all K
    layers then all V layers, is one group; a draft model's buffers with another size form their
    own group.
    """
    n = len(item_lens)
    if n == 0 or n % 2:
        raise ValueError(f"expected K and V buffers in pairs, got {n} KV buffers")
    half = n // 2
    if len(set(item_lens[:half])) == 1 and len(set(item_lens[half:])) == 1:
        return [(list(range(half)), list(range(half, n)))]
    groups, start = [], 0
    while start < n:
        stop = start
        while stop < n and item_lens[stop] == item_lens[start]:
            stop += 1
        run = stop - start
        if run % 2:
            raise ValueError(f"unsupported KV buffer layout (page sizes {list(item_lens)}): "
                             f"buffers {start}..{stop - 1} cannot be paired into K and V")
        groups.append((list(range(start, start + run // 2)), list(range(start + run // 2, stop))))
        start = stop
    return groups


class SlotCredits:
    """Free staging slots at one decode peer: taken before a write, given back by its ack."""

    def __init__(self, n_slots: int):
        if n_slots <= 0:
            raise ValueError(f"n_slots must be > 0, got {n_slots}")
        self.n_slots = n_slots
        self._free = list(range(n_slots))
        self._cond = threading.Condition()

    def take(self, timeout_s: float) -> int:
        """A free slot; ``PeerTimeout`` if none is returned within ``timeout_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=max(timeout_s, 0.0)):
                raise PeerTimeout(
                    f"no staging slot came back within {timeout_s:.1f}s "
                    f"(all {self.n_slots} in flight); the decode peer may have died"
                )
            return self._free.pop(0)

    def give(self, slot: int) -> None:
        """Return ``slot``; a slot that is not out (unknown or returned twice) is refused."""
        with self._cond:
            if not 0 <= slot < self.n_slots or slot in self._free:
                raise TransferError(f"staging slot {slot} was not taken (of {self.n_slots})")
            self._free.append(slot)
            self._cond.notify()
