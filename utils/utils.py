"""Rank-aware printing, seeding, device moves, distributed start-up and reductions."""
import json
import os
import random
import shutil
import socket

import numpy as np
import torch


def get_rank():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))



def print_rank_0(msg, rank=None):
    """Print once, from global rank 0 (the original printed on every rank at several call sites)."""
    if (get_rank() if rank is None else rank) <= 0:
        print(msg, flush=True)


def set_random_seed(seed):
    if seed is None:
        return
    from transformers import set_seed

    set_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from deepspeed import get_accelerator

    if get_accelerator().device_name() == "cuda":
        torch.cuda.manual_seed_all(seed)


def to_device(batch, device):
    """Move every tensor value of a dict to `device` (non-tensors are kept as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank=-1):
    """Start the process group; return (device, global_rank, world_size).

    Under the `deepspeed` launcher RANK/WORLD_SIZE/MASTER_* are set. Started as `python main.py`
    they are not, and the original crashed (`get_rank()` without a process group); DeepSpeed would
    fall back to MPI discovery. We set world-size-1 defaults instead.
    """
    import deepspeed
    from deepspeed import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if local_rank is None or local_rank < 0:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(), local_rank)
    else:
        device = torch.device(accelerator.device_name())
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        from utils.torch_extensions import warn_about_stale_build_locks

        warn_about_stale_build_locks()
    deepspeed.init_distributed()
    if accelerator.device_name() == "cpu":
        release_shm_allreduce_buffer()
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def shm_allreduce_buffer_path(rank):
    """The /dev/shm file DeepSpeed's CPU accelerator creates for this rank's shared-memory
    all-reduce (when every rank is on this host): 66 MB named by user, MASTER_ADDR, MASTER_PORT, rank."""
    return os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_"
                        f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_allreduce_buffer():
    """Unlink this rank's shared-memory all-reduce file once every rank has mapped it.

    DeepSpeed (0.19, CPU accelerator) never unlinks it, so each run left 66 MB per rank in
    /dev/shm (RAM) until the host ran out of memory. The mappings stay valid after the unlink and
    the memory is freed when the last rank exits. DeepSpeed opens its peers' files inside
    init_distributed, so after the barrier no rank needs the name any more.
    """
    barrier()
    try:
        os.unlink(shm_allreduce_buffer_path(torch.distributed.get_rank()))
    except FileNotFoundError:
        pass   # no shm all-reduce (ranks on several hosts, or the op not built)


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values):
    """Element-wise sum of a list of floats over ranks; returns a list of floats."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values):
    """Element-wise maximum of a list of floats over ranks; returns a list of floats."""
    return _all_reduce(values, "MAX")


def _all_reduce(values, op):
    values = [float(v) for v in values]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:   # nothing to exchange (no device sync)
        return values
    from deepspeed import get_accelerator

    tensor = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op))
    return tensor.cpu().tolist()


def save_args(args, output_dir):
    """`<output_dir>/args.json` as the original wrote it: JSON lines, one `{name: value}` per flag."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "args.json"), "w", encoding="utf-8") as f:
        for name, value in vars(args).items():
            try:
                json.dumps(value)
            except TypeError:
                value = str(value)
            f.write(json.dumps({name: value}, ensure_ascii=False) + "\n")


_CODE_IGNORE = ("output*", "log*", "result*", "dataset*", "checkpoint*", ".git", "*.pyc", ".idea",
                ".DS_Store", ".venv", "__pycache__", "demo_output", ".pytest_cache", "*.safetensors")


def save_code(output_dir):
    """Copy the project's code into `<output_dir>/code` (replacing an earlier copy: the original
    crashed when it existed, so a re-run into the same directory failed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.path.join(output_dir, "code")
    if os.path.abspath(output_dir).startswith(root + os.sep):
        return  # an output dir inside the project would copy itself
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns(*_CODE_IGNORE))
