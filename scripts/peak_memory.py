"""Run a Python script as `__main__` and, when the process exits, write its peak GPU memory as JSON.

    python scripts/peak_memory.py TARGET.py [ARGS...]        # also under the deepspeed launcher:
    deepspeed --num_gpus 1 scripts/peak_memory.py TARGET.py ARGS...

The launcher puts `--local_rank=N` right after the script it launches (this file); it is handed on
to TARGET with the rest of the arguments. The JSON goes to $SMOKE_STATS_FILE (nothing is written when
it is unset; under a launcher with several ranks, rank N > 0 writes `$SMOKE_STATS_FILE.rankN`):
`max_memory_allocated` / `max_memory_reserved` in bytes, as PyTorch's caching allocator counts them
on this process's current device (the CUDA context and memory DeepSpeed's inference kernels allocate
outside PyTorch are not included), or null without CUDA.
"""
import atexit
import json
import os
import runpy
import sys

STATS_ENV = "SMOKE_STATS_FILE"


def split_target(argv):
    """(target script, its argv[1:]): the first argument naming a .py file is the target."""
    for index, arg in enumerate(argv):
        if arg.endswith(".py") and not arg.startswith("-"):
            return arg, argv[:index] + argv[index + 1:]
    raise SystemExit("peak_memory.py: no target script (a .py path) among the arguments")


def peak_memory_stats():
    stats = {"max_memory_allocated": None, "max_memory_reserved": None}
    torch = sys.modules.get("torch")  # only a process that imported torch can have used the GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        # Stage 3 resets the allocator's peak per phase (utils/perf.py keeps the earlier ones).
        perf = sys.modules.get("utils.perf")
        allocated, reserved = perf.earlier_cuda_peaks() if perf is not None else (0, 0)
        stats = {"max_memory_allocated": max(allocated, torch.cuda.max_memory_allocated()),
                 "max_memory_reserved": max(reserved, torch.cuda.max_memory_reserved()),
                 "device": torch.cuda.get_device_name()}
    return stats


def write_stats(path):
    try:
        stats = peak_memory_stats()
    except Exception as err:  # noqa: BLE001 - a report at exit must not mask the script's own status
        stats = {"error": f"{type(err).__name__}: {err}"}
    with open(path, "w") as f:
        json.dump(stats, f)


def rank_stats_path(path, environ=None):
    """`path` for rank 0 (or a process without a launcher), `path.rank<N>` for rank N > 0, so the
    ranks of one run never write the same file."""
    rank = (os.environ if environ is None else environ).get("RANK", "0") or "0"
    return path if rank == "0" else f"{path}.rank{rank}"


def main():
    target, rest = split_target(sys.argv[1:])
    stats_path = os.environ.get(STATS_ENV)
    if stats_path:
        atexit.register(write_stats, rank_stats_path(stats_path))
    sys.argv = [target, *rest]
    # As `python TARGET.py` would: the target's directory first on sys.path (stage 3 imports its
    # sibling modules by name).
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
