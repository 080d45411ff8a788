"""The start-up check of a run on one or many nodes, before any model is built.

On one node every rank sees the same files, so a bad flag fails alike on all of them. On several
nodes a path can exist on one node and not on another (a dataset copied to one machine, an output
directory on a local disk): a rank that raised alone would leave the others waiting in their first
collective until the timeout. So every rank checks, then all of them exchange what they found
(that exchange is also the check that a collective works) and all raise the same one line, which
names the rank, its host and the path.

    start_checked(args, lambda: arguments.check_inputs(args, models=[...]))

Checked on every rank: the files the flags name (`check_inputs`: models, reward models, datasets,
tokenizers); that --output_dir and --data_output_path can be written; and that --output_dir is the
same directory for every rank (every rank writes its part of each checkpoint there and rank 0
publishes it, so it must be on a file system all nodes share). --data_output_path may be
node-local: each node's local rank 0 builds the cache it reads.
"""
import os
import socket
import time

import torch

from utils.errors import UserError, one_line
from utils.utils import init_distributed

PROBES = ".preflight"


def problem_of(check):
    """`check()`'s UserError message, or None."""
    try:
        check()
    except UserError as err:
        return str(err)
    except (OSError, ValueError) as err:   # e.g. an unreadable file: one rank must not fail alone
        return f"{type(err).__name__}: {one_line(err)}"
    return None


def start_checked(args, check_inputs):
    """`check_inputs()` on every rank, the process group, then `preflight`; returns
    init_distributed's (device, global rank, world size)."""
    input_problem = problem_of(check_inputs)
    device, rank, world_size = init_distributed(args.local_rank)
    preflight(args, input_problem, rank, world_size)
    return device, rank, world_size


def _gather(value, world_size):
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    values = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _writable(path, flag):
    """None, or the problem of creating a file in `path` (created when missing)."""
    probe = os.path.join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as err:
        return f"{flag} {path}: cannot write there ({err.strerror or err})"
    finally:
        _remove(probe)
    return None


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _unseen(output_dir, reports, attempts=5):
    """The reports (of ranks without a problem) whose probe this rank cannot see; looked for a few
    times, since a network file system may cache a directory's listing for a moment."""
    unseen = []
    for attempt in range(attempts):
        listed = set(os.listdir(os.path.join(output_dir, PROBES)))
        unseen = [r for r in reports if r["problem"] is None and _probe_name(r["host"], r["rank"]) not in listed]
        if not unseen:
            break
        time.sleep(0.2 * (attempt + 1))
    return unseen


def _probe_name(host, rank):
    port = os.environ.get("MASTER_PORT", "")
    return f"{host}-rank{rank}-port{port}"


def preflight(args, input_problem, rank, world_size):
    """Every rank together; raises the same UserError on every rank when any rank found a problem."""
    host = socket.gethostname()
    problem = input_problem
    for flag, path in (("--output_dir", getattr(args, "output_dir", None)),
                       ("--data_output_path", getattr(args, "data_output_path", None))):
        if problem is None and path:
            problem = _writable(path, flag)
    probe = None
    if problem is None and getattr(args, "output_dir", None):
        probe = os.path.join(args.output_dir, PROBES, _probe_name(host, rank))
        try:
            os.makedirs(os.path.dirname(probe), exist_ok=True)
            open(probe, "w").close()
        except OSError as err:
            problem, probe = f"--output_dir {args.output_dir}: cannot write there ({err.strerror or err})", None
    reports = _gather({"rank": rank, "host": host, "problem": problem}, world_size)
    if getattr(args, "output_dir", None):   # the same on every rank: so are the collectives below
        unseen = _unseen(args.output_dir, reports) if probe is not None else []
        if unseen and problem is None:
            other = unseen[0]
            problem = (f"--output_dir {args.output_dir} is not one directory for all ranks: this rank "
                       f"does not see the file rank {other['rank']} (host {other['host']}) wrote there; "
                       "checkpoints need a directory on a file system every node shares")
        shared = _gather({"rank": rank, "host": host, "problem": problem}, world_size)
        if probe is not None:
            _remove(probe)
        _remove_probe_dir(args.output_dir, world_size)
        reports = [r if r["problem"] else s for r, s in zip(reports, shared)]
    failing = [r for r in reports if r["problem"]]
    if failing:
        raise UserError(_summary(failing, world_size))


def _remove_probe_dir(output_dir, world_size):
    """After every rank removed its probe: each rank removes the directory it sees (on an output
    directory that is not shared, each node has its own)."""
    _gather(None, world_size)
    try:
        os.rmdir(os.path.join(output_dir, PROBES))
    except OSError:
        pass                      # removed by another rank already


def _summary(failing, world_size):
    """One line: the problem as it is when every rank had it, else prefixed by who had it."""
    first = failing[0]
    if len(failing) == world_size and all(r["problem"] == first["problem"] for r in failing):
        return first["problem"]
    others = f" (and {len(failing) - 1} more of {world_size} ranks)" if len(failing) > 1 else ""
    return f"rank {first['rank']} on host {first['host']}{others}: {first['problem']}"
