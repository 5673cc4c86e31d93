"""Entry point of the ``sglang.srt.plugins`` group: registers kvtier's two SGLang backends.

- ``--radix-cache-backend kvtier``: the radix cache whose evicted KV spills to kvtier's tiers.
- ``--disaggregation-transfer-backend kvtier``: kvtier's PD transfer backend. SGLang 0.5.17 has
  no registry for these, so the name is added to the CLI choices and to the ``TransferBackend``
  enum, and ``get_kv_class`` is wrapped (an AROUND hook) to return kvtier's classes for it.

A BEFORE hook on the scheduler's ``_add_request_to_queue`` lets the kvtier radix cache start
fetching a queued request's disk or remote chunks right away, not when the request is scheduled;
an AFTER hook on its ``get_new_batch_prefill`` (called at every step, also by SGLang's PD prefill
loop) launches the loads the cache queued while the batch formed, as one copy, and the spill-ahead
copies it held back while a load ran (so they run in the decode steps between loads).

SGLang calls ``register`` in its main process and again in every scheduler process it spawns.
"""

from __future__ import annotations

import logging

from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

logger = logging.getLogger(__name__)

BACKEND = "kvtier"
_pd_registered = False
_scheduler_hooks_registered = False
QUEUE_HOOK_TARGET = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"
STEP_HOOK_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"


def _build(ctx):  # imported lazily: torch-heavy modules stay out of processes that never build one
    from kvtier.sglang_ext.radix_cache import build

    return build(ctx)


def _prefetch_on_arrival(scheduler, req, *args, **kwargs) -> None:
    prefetch = getattr(getattr(scheduler, "tree_cache", None), "prefetch_on_arrival", None)
    if prefetch is None:  # another cache, or a PD decode without one
        return
    try:
        prefetch(req)
    except Exception:  # a prefetch is an optimization: the request must still be queued
        logger.exception("kvtier: prefetching request %s on arrival failed", getattr(req, "rid", "?"))


def _after_prefill_scheduled(plan, scheduler, *args, **kwargs) -> None:
    cache = getattr(scheduler, "tree_cache", None)
    launch_loads = getattr(cache, "launch_loads", None)
    if launch_loads is None:
        return
    # Not caught: the batch's forward pass would read rows that never arrived; the step must fail.
    launch_loads()
    try:
        cache.spill_deferred()
    except Exception:  # eviction still copies what was not copied ahead: log, keep scheduling
        logger.exception("kvtier: launching the spill-ahead copies held back failed")


def step_hook_applied() -> bool:
    """Whether SGLang patched its scheduler with the step hook (it logs and skips a target it cannot
    resolve, as a renamed method would be): the radix cache queues loads for the hook only then."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return STEP_HOOK_TARGET in HookRegistry._patched


def _register_scheduler_hooks() -> None:
    global _scheduler_hooks_registered
    if _scheduler_hooks_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(QUEUE_HOOK_TARGET, _prefetch_on_arrival, HookType.BEFORE)
    HookRegistry.register(STEP_HOOK_TARGET, _after_prefill_scheduled, HookType.AFTER)
    _scheduler_hooks_registered = True


def _get_kv_class(original, transfer_backend, class_type):
    if getattr(transfer_backend, "value", None) != BACKEND:
        return original(transfer_backend, class_type)
    from sglang.srt.disaggregation.base.conn import KVArgs
    from sglang.srt.disaggregation.utils import KVClassType

    from kvtier.sglang_ext import pd_conn

    return {
        KVClassType.KVARGS: KVArgs,
        KVClassType.MANAGER: pd_conn.KvtierKVManager,
        KVClassType.SENDER: pd_conn.KvtierKVSender,
        KVClassType.RECEIVER: pd_conn.KvtierKVReceiver,
        KVClassType.BOOTSTRAP_SERVER: pd_conn.KvtierKVBootstrapServer,
    }.get(class_type)


def _add_enum_member(enum_cls, name: str, value: str) -> None:
    """Adds ``enum_cls.<name> == enum_cls(value)`` to a closed Enum (it has no API to extend)."""
    if value in enum_cls._value2member_map_:
        return
    member = object.__new__(enum_cls)
    member._value_ = value
    member._name_ = name
    member.__objclass__ = enum_cls
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)


def _register_pd() -> None:
    global _pd_registered
    if _pd_registered:
        return
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import DISAGG_TRANSFER_BACKEND_CHOICES, add_disagg_transfer_backend_choices

    if BACKEND not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND])
    _add_enum_member(TransferBackend, "KVTIER", BACKEND)
    HookRegistry.register("sglang.srt.disaggregation.utils.get_kv_class", _get_kv_class, HookType.AROUND)
    _pd_registered = True


def register() -> None:
    if get_radix_cache_factory(BACKEND) is None:
        register_radix_cache_backend(BACKEND, _build)
    _register_scheduler_hooks()
    try:
        _register_pd()
    except Exception:
        # SGLang logs and swallows a plugin's exception; without this line the only trace
        # would be "'kvtier' is not a valid TransferBackend" much later.
        logger.exception("kvtier: registering --disaggregation-transfer-backend kvtier failed")
        raise
