"""Where DeepSpeed's just-in-time built ops live, and the stale build locks that hang a run.

DeepSpeed builds some ops on first use (on the CPU accelerator: the shared-memory all-reduce inside
init_distributed, cpu_adam for offload). torch guards each build with a `lock` file and waits
without a limit while it exists; a build that was killed leaves the file behind, and every later
run then hangs silently at start-up. We name such a file so the user can delete it.
"""
import os
import sys
import time

STALE_AFTER_S = 600


def extensions_root():
    """torch's build root: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<XY>_<cpu|cuXY>."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        device = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        device = "cu" + torch.version.cuda.replace(".", "")
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{device}")


def stale_build_locks(root=None, older_than_s=STALE_AFTER_S, now=None):
    """The `<root>/<op>/lock` files older than `older_than_s` seconds (no build takes that long)."""
    root = root or extensions_root()
    now = time.time() if now is None else now
    if not os.path.isdir(root):
        return []
    locks = (os.path.join(root, op, "lock") for op in sorted(os.listdir(root)))
    return [lock for lock in locks if os.path.exists(lock) and now - os.path.getmtime(lock) > older_than_s]


def warn_about_stale_build_locks(root=None):
    """One warning line per stale lock; returns the locks."""
    locks = stale_build_locks(root)
    for lock in locks:
        print(f"[startup] warning: {lock} is older than {STALE_AFTER_S // 60} min: a killed op build left it, "
              "and DeepSpeed will wait for it forever; delete it if no other process is building that op",
              flush=True)
    return locks
