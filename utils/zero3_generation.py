"""Generation under ZeRO-3 without the hybrid engine: gather the actor's parameters once per
`generate` call instead of once per module per decoded token.

Hugging Face `generate` on a ZeRO-3 module runs every forward through DeepSpeed's per-module hooks
(deepspeed/runtime/zero/parameter_offload.py:337-528, `_register_deepspeed_module`): before each
submodule the coordinator all-gathers its parameters (`_pre_forward_module_hook`, :359), after it
releases them (`_post_forward_module_hook`, :363 -> `release_sub_module`,
partitioned_param_coordinator.py:494, whose `__release_param`, :624, partitions every AVAILABLE
parameter no active submodule holds, even one gathered by an enclosing GatheredParameters). So a
7B actor moves its 13.5 GB (bf16) at every decoded token, and ranks must decode in lockstep
(`synced_gpus`), since every forward is a collective.

`generation_parameters(engine)` instead, for a ZeRO-3 engine:

1. decides, the same on every rank, whether the gathered model fits: the bytes of the partitioned
   parameters (sum of ds_numel x element size) against the free accelerator memory, with headroom
   (`gather_decision`, a pure function; on the CPU the host's available memory, shared by the
   local ranks). When it does not fit, nothing changes (per-layer gathering) and rank 0 logs why;
2. waits for any all-gather still in flight (the handles are idempotent), then all-gathers the
   parameters that are NOT_AVAILABLE in one `GatheredParameters` (partition_parameters.py:2337),
   as the hybrid engine does around its generate (`get_inactive_params` + `GatheredParameters`,
   hybrid_engine.py:309-319, runtime/utils.py:1107); parameters already available (ZeRO-3's
   persistent small ones) are left alone;
3. takes DeepSpeed's hooks out of the modules for the block: every handle in the parameter
   offload's `forward_hooks` and `backward_hooks`, and its root-module `fwd_pre_hook`
   (parameter_offload.py:308), whose `reset_step` runs a cross-rank check
   (`assert_ints_same_as_other_ranks`, partitioned_param_coordinator.py:260) at a forward whenever
   the recorded trace is not complete;
4. on exit (also on an exception) puts each hook back in its module's hook dict under its own id
   at its own place, then re-partitions exactly the parameters it gathered.

Unlike removing the hooks and registering new ones afterwards (DeepSpeed's own
`deepspeed.runtime.zero.unwrap_model_for_generation`, stage3.py:94-124, and TRL's
`unwrap_model_for_generation` with `remove_hooks` / `add_hooks`), nothing is re-registered: the
modules keep their ds_ids, the hooks their order among other hooks, the coordinator its recorded
trace, and no parameter's `ds_active_sub_modules` can hold a stale module id (why TRL clears them).
Those keep the root `fwd_pre_hook`, so their forwards may still run that check. Here, with every
hook out and every parameter gathered, a forward runs no collective: each rank decodes on its own
and the caller drops `synced_gpus` (the answers are the same: under `synced_gpus` a rank that has
finished only runs forwards whose outputs it discards, drawing no random numbers).
"""
import contextlib
import os

import torch

from utils.utils import all_reduce_max, print_rank_0

# Share of the free memory kept for what generation needs besides the weights (the KV cache,
# activations, logits, the allocator's fragmentation): the gathered model may use the rest.
GENERATION_HEADROOM = 0.2

MIB = 2 ** 20

# Per engine (by id): the last decision logged, so rank 0 logs one line per change, not per call.
_last_logged = {}


# ------------------------------------------------------------------------------ the decision

def gather_decision(gathered_bytes, free_bytes, headroom=GENERATION_HEADROOM):
    """(gather once: bool, reason: str). Pure.

    gathered_bytes: what the gathered parameters take (sum of ds_numel x element size of the
    partitioned ones); free_bytes: the free accelerator memory (the least over the ranks), None
    when unknown (then gather). Gathers when gathered_bytes <= (1 - headroom) x free_bytes.
    """
    if gathered_bytes <= 0:
        return True, "no partitioned parameter to gather"
    if free_bytes is None:
        return True, (f"the gathered actor takes {gathered_bytes / MIB:.1f} MiB; free memory "
                      "unknown, gathering")
    budget = (1.0 - headroom) * free_bytes
    sizes = (f"the gathered actor takes {gathered_bytes / MIB:.1f} MiB, free memory is "
             f"{free_bytes / MIB:.1f} MiB (the least on any rank; {headroom:.0%} of it is kept "
             "for the KV cache and activations)")
    if gathered_bytes <= budget:
        return True, sizes
    return False, sizes


def gathered_bytes(params):
    """Bytes of `params` once gathered: sum of ds_numel x element size."""
    return sum(int(p.ds_numel) * p.element_size() for p in params)


def free_memory_bytes(device_name=None):
    """Free memory for the gathered parameters on this rank's accelerator, or None if unknown.

    CUDA: the driver's free memory (torch.cuda.mem_get_info) plus what PyTorch's caching allocator
    holds reserved but unused. CPU: MemAvailable of /proc/meminfo divided among the ranks of this
    host, which gather at the same time (LOCAL_SIZE from the deepspeed launcher, LOCAL_WORLD_SIZE
    from torchrun).
    """
    if device_name is None:
        from deepspeed.accelerator import get_accelerator

        device_name = get_accelerator().device_name()
    if device_name == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    if device_name == "cpu":
        available = _meminfo_available_bytes()
        if available is None:
            return None
        local_ranks = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"
        return available // max(1, int(local_ranks))
    return None


def _meminfo_available_bytes(path="/proc/meminfo"):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _agreed_decision(needed, free):
    """`gather_decision` on the largest need and the least free memory over the ranks: the
    gather is a collective, so every rank must take the same branch. One small all-reduce."""
    free_value = float("inf") if free is None else float(free)
    worst_needed, neg_least_free = all_reduce_max([float(needed), -free_value])
    least_free = None if neg_least_free == float("-inf") else int(-neg_least_free)
    return gather_decision(int(worst_needed), least_free)


# ------------------------------------------------------------------------------ the hooks

def parameter_offload(engine):
    """The DeepSpeedZeRoOffload that owns a ZeRO-3 engine's per-module hooks, or None (not an
    engine, not ZeRO-3, or the hybrid engine, whose generate gathers by itself)."""
    try:
        from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    except ImportError:
        return None
    if isinstance(engine, DeepSpeedHybridEngine):
        return None
    optimizer = getattr(engine, "optimizer", None)
    # A trained engine's ZeRO-3 optimizer holds it (stage3.py, `self.parameter_offload`); a frozen
    # engine's optimizer slot is the offload object itself (engine.py, `DeepSpeedZeRoOffload(...)`).
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if isinstance(offload, DeepSpeedZeRoOffload) else None


def zero3_hook_handles(offload):
    """Every hook handle DeepSpeed's parameter offload registered on its module tree."""
    handles = list(offload.forward_hooks) + list(offload.backward_hooks)
    root = getattr(offload, "fwd_pre_hook", None)
    return handles + ([root] if root is not None else [])


@contextlib.contextmanager
def suspended_hooks(handles):
    """Take the hooks of `handles` (torch RemovableHandles) out of their hook dicts for the block;
    afterwards put each back under its own id at its own position (hooks registered meanwhile
    keep theirs, after). The handles stay valid, so `handle.remove()` still works later."""
    taken = {}   # id(hook dict) -> (the dict, its key order before, {hook id: hook})
    for handle in handles:
        for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
            hooks = ref()
            if hooks is None or handle.id not in hooks:
                continue
            entry = taken.setdefault(id(hooks), (hooks, list(hooks), {}))
            entry[2][handle.id] = hooks.pop(handle.id)
    try:
        yield
    finally:
        for hooks, order, removed in taken.values():
            now = dict(hooks)
            hooks.clear()
            for key in order:
                if key in removed:
                    hooks[key] = removed[key]
                elif key in now:
                    hooks[key] = now.pop(key)
            hooks.update(now)


# ------------------------------------------------------------------------------ the context

def partitioned_parameters(module):
    """The parameters of `module` (and the external ones its submodules registered) that are
    partitioned now (ZeRO-3 status NOT_AVAILABLE), in ds_id order, each once."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    seen, found = set(), []
    candidates = list(module.parameters())
    for sub in module.modules():
        external = getattr(sub, "ds_external_parameters", None)
        if external is not None:
            candidates.extend(p for _, p in external())
    for p in candidates:
        if (hasattr(p, "ds_id") and id(p) not in seen
                and p.ds_status == ZeroParamStatus.NOT_AVAILABLE):
            seen.add(id(p))
            found.append(p)
    return sorted(found, key=lambda p: p.ds_id)


def _wait_in_flight(module):
    """Finish any prefetch all-gather still in flight (the coordinator's registry keeps the
    handles; waiting twice is a no-op, so its next `reset_step` releases them as usual)."""
    registry = getattr(module, "ds_inflight_param_registry", None)
    for handle in list((registry or {}).values()):
        handle.wait()


@contextlib.contextmanager
def generation_parameters(engine, enabled=True):
    """Around a `generate` of `engine`'s module: yields True when the ZeRO-3 parameters are gathered
    once for the block (DeepSpeed's per-module hooks out, no collective in any forward: the
    caller may decode without `synced_gpus`), False when nothing was changed (not ZeRO-3, the
    hybrid engine, `enabled` False, or the gathered model would not fit: per-layer gathering).
    Every rank must enter it (the decision and the gather are collectives)."""
    offload = parameter_offload(engine) if enabled else None
    if offload is None:
        yield False
        return
    module = offload.module
    _wait_in_flight(module)
    params = partitioned_parameters(module)
    needed = gathered_bytes(params)
    gather, reason = _agreed_decision(needed, free_memory_bytes())
    _log_change(engine, gather, reason)
    if not gather:
        yield False
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(params), suspended_hooks(zero3_hook_handles(offload)):
        yield True


def _log_change(engine, gather, reason):
    key = id(engine)
    if _last_logged.get(key) == gather:
        return
    _last_logged[key] = gather
    if gather:
        print_rank_0(f"[generation] ZeRO-3: the actor's parameters are gathered once per generate "
                     f"call, and ranks decode without synced_gpus ({reason})")
    else:
        print_rank_0(f"[generation] ZeRO-3: per-layer gathering while decoding, because the "
                     f"gathered actor would not fit: {reason}")
