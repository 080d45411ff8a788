"""Resumable training checkpoints: DeepSpeed engine states + loop state + every rank's RNG, written
atomically, found again, pruned, and loaded back exactly.

Layout of `<output_dir>`:

    checkpoints/
        step_<N>/                   one checkpoint, complete once renamed here
            <engine>/step_<N>/...   engine.save_checkpoint(<engine dir>, tag="step_<N>") for each
                                    engine (model, optimizer, LR scheduler, loss scaler, step)
            rng_rank_<r>.pt         python, numpy, torch and accelerator RNG of rank r
            loop_state.json         what the training loop needs to continue (epoch, position...)
            complete.json           written last, before the rename: step, world size, engines
            universal/              DeepSpeed's universal conversion, made on a world-size change
        latest                      the name of the newest complete checkpoint, advanced last
        .tmp-step_<N>/              a save in progress (or killed): ignored, then removed
    run_complete.json               written at the very end of a successful run

A save: rank 0 makes `.tmp-step_<N>/`; every rank's engines write into it (DeepSpeed's own
`latest` file is not written: `save_latest=False`); every rank writes its RNG; after a barrier rank
0 writes the loop state, fsyncs everything, writes `complete.json`, renames the directory to
`step_<N>/`, fsyncs, then replaces `latest`; a last barrier. A kill at any point leaves either
the previous `latest` or the new one, never a half checkpoint under a `step_` name that `latest`
names. Resume reads `latest`; `step_` directories that `latest` does not reach (an interrupted
save, an abandoned branch) and temporary directories are ignored and reported.

Stage 3 can use the same calls with several engines (`{"actor": a, "critic": c, "ema": e}`) and
its own loop-state dict; see `Checkpointer`, `prepare_output_dir`, `load_training_checkpoint`
and `restore_rng`.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.atomic import (fsync_dir, fsync_file, fsync_tree,  # noqa: F401 (callers import them here)
                          write_json_atomic, write_text_atomic)
from utils.errors import UserError
from utils.utils import all_reduce_sum, barrier, get_rank, get_world_size, print_rank_0

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"
LOOP_STATE = "loop_state.json"
RUN_COMPLETE = "run_complete.json"
UNIVERSAL = "universal"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")

# Test hook: the save of this step writes its engines and RNG files, then rank 0 creates
# `<tmp dir>/PAUSED` and every rank waits until it is deleted (a test kills the run meanwhile,
# or signals it and lets it go on).
PAUSE_IN_SAVE_ENV = "REMAX_TEST_PAUSE_IN_SAVE"
PAUSED = "PAUSED"


class ResumeError(UserError):
    """A resume that cannot go on, or an output directory that must not be reused (one line,
    exit code 2 under utils/errors.py's run_main)."""


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

def add_checkpoint_args(parser):
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--save_steps", type=int, default=0,
                       help="Save a resumable checkpoint every N optimizer steps (0: only at the "
                            "end and on SIGTERM).")
    group.add_argument("--resume", action="store_true",
                       help="Continue from the newest complete checkpoint in --output_dir "
                            "(an error if there is none).")
    group.add_argument("--resume_from", type=str, default=None,
                       help="Continue from this checkpoint directory (.../checkpoints/step_N).")
    group.add_argument("--keep_checkpoints", type=int, default=0,
                       help="Keep the newest K checkpoints (plus the best one); 0 keeps all.")
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start afresh in an --output_dir that holds a finished run or "
                            "checkpoints (they are deleted).")
    group.add_argument("--universal", action="store_true",
                       help="Resume through DeepSpeed's universal checkpoint (converted once, "
                            "inside the checkpoint): needed when the number of ranks changed.")
    group.add_argument("--stop_after_steps", type=int, default=None, help=argparse.SUPPRESS)
    return group


def check_checkpoint_args(args):
    """The flags alone; raises ResumeError naming the flag."""
    if args.resume and args.resume_from:
        raise ResumeError("pass either --resume or --resume_from DIR, not both")
    if args.save_steps < 0 or args.keep_checkpoints < 0:
        raise ResumeError("--save_steps and --keep_checkpoints must be >= 0")
    if args.overwrite_output_dir and (args.resume or args.resume_from):
        raise ResumeError("--overwrite_output_dir starts afresh; it cannot be combined with "
                          "--resume / --resume_from")
    if args.universal and not (args.resume or args.resume_from):
        raise ResumeError("--universal only applies to a resume (--resume or --resume_from)")


# ----------------------------------------------------------------------------------------------
# Files: the layout (atomic writes and fsync: utils/atomic.py)
# ----------------------------------------------------------------------------------------------

def checkpoint_root(output_dir):
    return os.path.join(output_dir, CHECKPOINTS)


def checkpoint_name(step):
    return f"step_{step}"


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_tree(path):
    """Rename `path` to a `.trash-` sibling, then delete it: a kill half-way through never leaves
    a partly deleted directory under its old name."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _move_into(src, dst):
    """Move one file or directory `src` to `dst`, replacing it; each name is always either the
    old or the new entry."""
    if os.path.isdir(src) and os.path.isdir(dst):
        parent, name = os.path.split(dst)
        old = os.path.join(parent, f"{TRASH_PREFIX}{name}-{time.time_ns()}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def export_atomic(output_dir, write):
    """The Hugging Face export, kept apart from the checkpoints and atomic per file.

    `write(directory)` runs on every rank (a ZeRO-3 gather is a collective); what rank 0 wrote
    into a temporary directory is fsynced, then moved into `output_dir` entry by entry with
    `os.replace`, so a reader (or a kill) sees each file either whole from the previous export or
    whole from this one; never a truncated config, tokenizer or weights file.
    """
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}export")
    if get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    write(tmp)
    barrier()
    if get_rank() == 0:
        fsync_tree(tmp)
        for name in sorted(os.listdir(tmp)):
            _move_into(os.path.join(tmp, name), os.path.join(output_dir, name))
        fsync_dir(output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    path: str
    step: int
    meta: dict

    @property
    def metric(self):
        return (self.meta.get("metric") or {}).get("value")


@dataclass
class CheckpointScan:
    valid: list = field(default_factory=list)     # [CheckpointInfo], oldest first, up to `latest`
    ignored: list = field(default_factory=list)   # [(path, reason)]
    latest: str = None                            # the name in `latest`, if any

    @property
    def newest(self):
        return self.valid[-1] if self.valid else None

    def report(self, what="checkpoint"):
        for path, reason in self.ignored:
            print_rank_0(f"[{what}] ignoring {path}: {reason}")


def read_checkpoint_meta(path):
    """`complete.json` of a checkpoint directory, or None when it is not complete."""
    return read_json(os.path.join(path, COMPLETE))


def scan_checkpoints(output_dir):
    """Which checkpoints under `<output_dir>/checkpoints` a resume may use, and which it ignores.

    Valid: complete (`complete.json`) `step_<N>` directories with N at most the step of the one
    `latest` names. Ignored: temporary directories (a save or delete that was killed),
    directories without `complete.json`, and complete ones newer than `latest` (killed between
    the rename and `latest`, or left by a run resumed from an older checkpoint). Without a
    `latest` file nothing is valid.
    """
    root = checkpoint_root(output_dir)
    scan = CheckpointScan()
    if not os.path.isdir(root):
        return scan
    latest_path = os.path.join(root, LATEST)
    if os.path.isfile(latest_path):
        with open(latest_path, encoding="utf-8") as f:
            scan.latest = f.read().strip() or None
    match = _STEP_DIR.fullmatch(scan.latest or "")
    latest_step = int(match.group(1)) if match else None
    complete = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            scan.ignored.append((path, "a temporary directory of an interrupted save or delete"))
            continue
        match = _STEP_DIR.fullmatch(name)
        if match is None:
            continue
        meta = read_checkpoint_meta(path)
        if meta is None:
            scan.ignored.append((path, f"no {COMPLETE} (not a complete checkpoint)"))
            continue
        complete.append(CheckpointInfo(path, int(match.group(1)), meta))
    complete.sort(key=lambda c: c.step)
    for info in complete:
        if latest_step is None:
            scan.ignored.append((info.path, f"no `{LATEST}` marker in {root}"))
        elif info.step > latest_step:
            scan.ignored.append((info.path, f"newer than `{LATEST}` ({scan.latest}): an "
                                            "interrupted save, or a run resumed from an older "
                                            "checkpoint"))
        else:
            scan.valid.append(info)
    if scan.latest is not None and (scan.newest is None or scan.newest.step != latest_step):
        scan.ignored.append((os.path.join(root, scan.latest),
                             f"named by `{LATEST}` but missing or incomplete"))
    return scan


def best_checkpoint(checkpoints):
    """The checkpoint with the best recorded metric (the earliest of equals), or None."""
    scored = [c for c in checkpoints if c.metric is not None]
    if not scored:
        return None
    if scored[-1].meta["metric"].get("higher_is_better"):
        return max(scored, key=lambda c: (c.metric, -c.step))
    return min(scored, key=lambda c: (c.metric, c.step))


def prune_checkpoints(output_dir, keep):
    """Delete all but the newest `keep` valid checkpoints, never the best one (rank 0 only).
    Returns the deleted paths."""
    if not keep:
        return []
    scan = scan_checkpoints(output_dir)
    protected = {c.path for c in scan.valid[-keep:]}
    best = best_checkpoint(scan.valid)
    if best is not None:
        protected.add(best.path)
    deleted = [c.path for c in scan.valid if c.path not in protected]
    for path in deleted:
        remove_tree(path)
    return deleted


def remove_temporary_dirs(output_dir):
    """Rank 0: delete what a killed save, export or delete left behind in `output_dir` and its
    checkpoints directory (`.tmp-*` / `.trash-*` directories, `*.tmp` files)."""
    removed = []
    for directory in (output_dir, checkpoint_root(output_dir)):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isfile(path) and name.endswith(".tmp"):
                os.remove(path)
            else:
                continue
            removed.append(os.path.relpath(path, output_dir))
    return removed


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------

def capture_rng_state():
    """This process's python, numpy, torch (CPU) and accelerator generators, as plain data that
    `torch.load(weights_only=True)` reads."""
    from deepspeed import get_accelerator

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached},
             "torch": torch.get_rng_state(),
             "accelerator_name": get_accelerator().device_name()}
    if state["accelerator_name"] != "cpu":  # the CPU accelerator's generator is torch's
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def set_rng_state(state):
    from deepspeed import get_accelerator

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        if state["accelerator_name"] != get_accelerator().device_name():
            raise ResumeError(f"the checkpoint's RNG is of a {state['accelerator_name']} "
                              f"accelerator, this run has {get_accelerator().device_name()}")
        get_accelerator().set_rng_state(state["accelerator"])


def rng_file(checkpoint_dir, rank):
    return os.path.join(checkpoint_dir, f"rng_rank_{rank}.pt")


def restore_rng(plan):
    """Set this rank's generators to those saved in `plan`'s checkpoint. Call it last: right
    before the first resumed step, after every loader, model and evaluation set-up (anything that
    draws after it would shift the stream). A rank the checkpoint had no RNG for (more ranks than
    when it was saved) keeps its seeded generators."""
    if plan is None:
        return False
    path = rng_file(plan.checkpoint_dir, get_rank())
    if not os.path.exists(path):
        print(f"[resume] rank {get_rank()}: no {os.path.basename(path)} in the checkpoint; "
              "this rank keeps its seeded generators", flush=True)
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------

def _universal_client_state():
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    # What DeepSpeed's ds_to_universal requires of a checkpoint (Megatron writes it; we do too).
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                        UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def _zero_stage(engine):
    try:
        return int(engine.zero_optimization_stage())
    except AttributeError:
        return 0


def _has_optimizer(engine):
    """DeepSpeed's own test (a client optimizer or one in the config); a frozen engine's
    `optimizer` may be a ZeRO-3 parameter-offload wrapper, which cannot save_checkpoint."""
    if hasattr(engine, "optimizer_name"):
        return bool(engine.optimizer_name())
    return getattr(engine, "optimizer", None) is not None


MODULE_STATE = "module_state.pt"


def _save_module_state(engine, directory):
    """A frozen engine (no optimizer: an EMA copy, say) as its full state dict, gathered one
    parameter at a time and written by rank 0: DeepSpeed's save_checkpoint cannot save a ZeRO-3
    engine without an optimizer, and the full state loads on any number of ranks."""
    from utils.model.model_utils import unwrap
    from utils.module.lora import gathered_parameters

    module = unwrap(engine)
    state = {}
    for name, param in module.named_parameters():
        with gathered_parameters([param]):
            if get_rank() == 0:
                state[name] = param.data.detach().cpu().clone()
    if get_rank() == 0:
        state.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()})
        os.makedirs(directory, exist_ok=True)
        torch.save(state, os.path.join(directory, MODULE_STATE))


def _load_module_state(engine, directory):
    from utils.model.model_utils import load_state_dict_into_model, unwrap

    module = unwrap(engine)
    state = torch.load(os.path.join(directory, MODULE_STATE), map_location="cpu",
                       weights_only=True)
    missing = sorted({n for n, _ in module.named_parameters()} - set(state))
    if missing:
        raise ResumeError(f"{directory}/{MODULE_STATE} lacks {len(missing)} parameters, e.g. "
                          f"{missing[:3]}")
    load_state_dict_into_model(module, state)


def _pause_if_asked(tmp_dir, step):
    if os.environ.get(PAUSE_IN_SAVE_ENV) != str(step):
        return
    paused = os.path.join(tmp_dir, PAUSED)
    if get_rank() == 0:
        open(paused, "w").close()
    barrier()
    while os.path.exists(paused):
        time.sleep(0.05)
    barrier()


def save_training_checkpoint(output_dir, step, engines, loop_state, metric=None, keep=0):
    """Save a resumable checkpoint `<output_dir>/checkpoints/step_<step>`; every rank calls it.

    engines: {name: DeepSpeed engine}, each saved with `save_checkpoint(<dir>/<name>,
        tag="step_<step>", save_latest=False)` (model, optimizer, LR scheduler, loss scaler).
    loop_state: a JSON-serialisable dict (rank 0's is written).
    metric: {"name", "value", "step", "higher_is_better"} of the evaluation this checkpoint stands
        for, or None; `keep` > 0 prunes to the newest `keep` plus the best by this metric.
    Returns the checkpoint directory.
    """
    root = checkpoint_root(output_dir)
    name = checkpoint_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, TMP_PREFIX + name)
    start = time.time()
    if get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    client_state = _universal_client_state()
    for engine_name, engine in engines.items():
        if _has_optimizer(engine):
            engine.save_checkpoint(os.path.join(tmp, engine_name), tag=name,
                                   client_state=client_state, save_latest=False)
        else:
            _save_module_state(engine, os.path.join(tmp, engine_name, name))
    torch.save(capture_rng_state(), rng_file(tmp, get_rank()))
    fsync_file(rng_file(tmp, get_rank()))
    _pause_if_asked(tmp, step)
    barrier()
    if get_rank() == 0:
        write_json_atomic(os.path.join(tmp, LOOP_STATE), loop_state)
        fsync_tree(tmp)
        meta = {"format": FORMAT_VERSION, "step": step, "name": name,
                "world_size": get_world_size(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "engines": {n: _engine_meta(tmp, n, e, name) for n, e in engines.items()},
                "metric": metric}
        write_json_atomic(os.path.join(tmp, COMPLETE), meta)
        if os.path.exists(final):  # a step saved again (a run resumed from an older checkpoint)
            remove_tree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        write_text_atomic(os.path.join(root, LATEST), name)
        deleted = prune_checkpoints(output_dir, keep)
        print_rank_0(f"[checkpoint] saved {final} in {time.time() - start:.1f}s"
                     + (f"; deleted {', '.join(os.path.basename(d) for d in deleted)}"
                        if deleted else ""))
    barrier()
    return final


def _optimizer_files(tag_dir):
    return sorted(f for f in os.listdir(tag_dir) if f.endswith("optim_states.pt"))


def _engine_meta(tmp, engine_name, engine, tag):
    """How an engine was saved: a DeepSpeed checkpoint (its ZeRO stage, its optimizer files)
    or, for a frozen engine, a gathered module state (`zero_stage` 0: loads on any world size)."""
    tag_dir = os.path.join(tmp, engine_name, tag)
    if not _has_optimizer(engine):
        return {"tag": tag, "kind": "module", "zero_stage": 0}
    return {"tag": tag, "kind": "deepspeed", "zero_stage": _zero_stage(engine),
            "optimizer_files": len(_optimizer_files(tag_dir))}


def _check_engine_files(checkpoint_dir, meta, name):
    """Every optimizer partition the save wrote is there: DeepSpeed would silently fall back to
    the weights alone when one is missing."""
    engine = meta["engines"][name]
    if engine.get("kind") != "deepspeed":
        return
    tag_dir = os.path.join(checkpoint_dir, name, engine["tag"])
    found = _optimizer_files(tag_dir) if os.path.isdir(tag_dir) else []
    if len(found) != engine["optimizer_files"]:
        raise ResumeError(f"{tag_dir} holds {len(found)} optimizer state files, the save wrote "
                          f"{engine['optimizer_files']}")


def load_training_checkpoint(plan, engines, load_optimizer_states=True):
    """Load every engine of `plan.checkpoint_dir` (all ranks call it); returns the loop state.

    A `load_checkpoint` that returns no path is an error, never a fresh start. The RNG is not
    touched here: call `restore_rng(plan)` right before the first resumed step.
    """
    meta = plan.meta
    missing = sorted(set(engines) - set(meta["engines"]))
    if missing:
        raise ResumeError(f"{plan.checkpoint_dir} has engines {sorted(meta['engines'])}, this run "
                          f"needs {sorted(engines)}")
    start = time.time()
    for name, engine in engines.items():
        tag = meta["engines"][name]["tag"]
        if meta["engines"][name].get("kind") == "module":
            _load_module_state(engine, os.path.join(plan.checkpoint_dir, name, tag))
            continue
        if name in plan.universal_engines:
            load_dir = os.path.join(plan.checkpoint_dir, UNIVERSAL, name)
        else:
            load_dir = os.path.join(plan.checkpoint_dir, name)
            _check_engine_files(plan.checkpoint_dir, meta, name)
        path, _ = engine.load_checkpoint(load_dir, tag=tag,
                                         load_optimizer_states=load_optimizer_states,
                                         load_lr_scheduler_states=load_optimizer_states)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load engine '{name}' from {load_dir} "
                              f"(tag {tag}): load_checkpoint returned nothing")
    print_rank_0(f"[resume] loaded {', '.join(engines)} from {plan.checkpoint_dir} "
                 f"(step {meta['step']}{', universal' if plan.universal_engines else ''}) in "
                 f"{time.time() - start:.1f}s")
    return plan.loop_state


# ----------------------------------------------------------------------------------------------
# World-size changes: DeepSpeed's universal checkpoint
# ----------------------------------------------------------------------------------------------

def universal_ds_config(ds_config):
    """A copy of `ds_config` whose engine loads universal checkpoints."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert_to_universal(checkpoint_dir, engine_names=None):
    """Rank 0: DeepSpeed's `ds_to_universal` for each engine (ZeRO 1-3) of a checkpoint, into
    `<checkpoint>/universal/<engine>/<tag>`, atomically; done once, then reused."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    meta = read_checkpoint_meta(checkpoint_dir)
    names = engine_names or [n for n, e in meta["engines"].items() if e["zero_stage"] > 0]
    target = os.path.join(checkpoint_dir, UNIVERSAL)
    done = read_json(os.path.join(target, COMPLETE)) or {}
    if all(n in done.get("engines", []) for n in names):
        return target
    tmp = os.path.join(checkpoint_dir, TMP_PREFIX + UNIVERSAL)
    shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        tag = meta["engines"][name]["tag"]
        ds_to_universal(argparse.Namespace(
            input_folder=os.path.join(checkpoint_dir, name, tag),
            output_folder=os.path.join(tmp, name, tag), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    write_json_atomic(os.path.join(tmp, COMPLETE), {"engines": names})
    fsync_tree(tmp)
    remove_tree(target)
    os.rename(tmp, target)
    fsync_dir(checkpoint_dir)
    return target


def _weights_only_hint(output_dir):
    return (f"or restart from the weights only: the Hugging Face export in {output_dir} as "
            "--model_name_or_path of a new run with a fresh --output_dir (optimizer, schedule and "
            "data position start over)")


def _plan_universal(args, checkpoint_dir, meta, world_size):
    """The engines to load through a universal checkpoint (converting once), or raise."""
    partitioned = [n for n, e in meta["engines"].items() if e["zero_stage"] > 0]
    if meta["world_size"] == world_size and not args.universal:
        return []
    if not partitioned:  # ZeRO 0: every rank holds the whole state; any world size loads it
        return []
    if not args.universal:
        raise ResumeError(
            f"{checkpoint_dir} was written by {meta['world_size']} rank(s), this run has "
            f"{world_size}: ZeRO's optimizer state is partitioned per rank. Resume again with "
            f"--universal (DeepSpeed's universal checkpoint, converted once inside the "
            f"checkpoint), {_weights_only_hint(args.output_dir)}")
    failure = ""
    if get_rank() == 0:
        try:
            print_rank_0(f"[resume] converting {checkpoint_dir} to DeepSpeed's universal format "
                         f"({meta['world_size']} -> {world_size} ranks) ...")
            convert_to_universal(checkpoint_dir, partitioned)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = f"{type(exc).__name__}: {exc}"
            print(f"[resume] DeepSpeed's ds_to_universal failed: {failure}", flush=True)
    if all_reduce_sum([1.0 if failure else 0.0])[0] > 0:
        raise ResumeError(f"DeepSpeed could not convert {checkpoint_dir} to a universal "
                          f"checkpoint{' (' + failure + ')' if failure else ''}; resume with "
                          f"{meta['world_size']} rank(s), {_weights_only_hint(args.output_dir)}")
    return partitioned


# ----------------------------------------------------------------------------------------------
# The output directory: finished-run guard, resume plan
# ----------------------------------------------------------------------------------------------

@dataclass
class ResumePlan:
    checkpoint_dir: str
    meta: dict
    loop_state: dict
    universal_engines: list     # engines loaded through DeepSpeed's universal checkpoint
    world_size: int             # of this run

    @property
    def step(self):
        return self.meta["step"]

    @property
    def saved_world_size(self):
        return self.meta["world_size"]

    @property
    def universal(self):
        return bool(self.universal_engines)


def clear_run_outputs(output_dir, extra=("metrics.jsonl",)):
    """Rank 0, for --overwrite_output_dir: delete the checkpoints, the finished-run marker and the
    metric log of an earlier run (the data cache and the export files are left)."""
    remove_tree(checkpoint_root(output_dir))
    for name in (RUN_COMPLETE, *extra):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _resolve_checkpoint(args):
    if args.resume_from:
        path = os.path.abspath(args.resume_from)
        if read_checkpoint_meta(path) is None:
            raise ResumeError(f"--resume_from {args.resume_from} is not a complete checkpoint "
                              f"(no {COMPLETE}; expected .../{CHECKPOINTS}/step_N)")
        return path
    scan = scan_checkpoints(args.output_dir)
    scan.report("resume")
    if scan.newest is None:
        raise ResumeError(f"--resume found no complete checkpoint in "
                          f"{checkpoint_root(args.output_dir)}; start without --resume (add "
                          "--overwrite_output_dir if the directory holds an earlier run)")
    return scan.newest.path


def prepare_output_dir(args, world_size=None):
    """Before any model is built, on every rank: the resume plan, or None for a fresh run.

    Fresh: an `--output_dir` holding a finished run (`run_complete.json`) or complete
    checkpoints is refused unless --overwrite_output_dir (which clears them); a stale directory
    with only a data cache or partial state is fine (leftover temporary directories are removed).
    Resume (--resume / --resume_from): the checkpoint is found, its loop state read, a
    world-size change planned through DeepSpeed's universal checkpoint (--universal), the
    finished-run marker removed (the run is going on again).
    """
    check_checkpoint_args(args)
    world_size = world_size or get_world_size()
    out = args.output_dir
    if not (args.resume or args.resume_from):
        finished = os.path.exists(os.path.join(out, RUN_COMPLETE))
        scan = scan_checkpoints(out)
        if (finished or scan.valid) and not args.overwrite_output_dir:
            what = "a finished run" if finished else f"checkpoints (newest {scan.newest.path})"
            raise ResumeError(f"--output_dir {out} holds {what}: pass --resume to continue it, "
                              "--overwrite_output_dir to start over, or another --output_dir")
        barrier()
        if get_rank() == 0:
            if finished or scan.valid or args.overwrite_output_dir:
                clear_run_outputs(out)
            elif scan.ignored:  # partial state of an interrupted run that is not resumed
                scan.report("output_dir")
                remove_tree(checkpoint_root(out))
            remove_temporary_dirs(out)
        barrier()
        return None
    checkpoint_dir = _resolve_checkpoint(args)
    meta = read_checkpoint_meta(checkpoint_dir)
    loop_state = read_json(os.path.join(checkpoint_dir, LOOP_STATE))
    if loop_state is None:
        raise ResumeError(f"{checkpoint_dir} has no readable {LOOP_STATE}")
    universal_engines = _plan_universal(args, checkpoint_dir, meta, world_size)
    barrier()
    if get_rank() == 0:
        removed = remove_temporary_dirs(out)
        if removed:
            print_rank_0(f"[resume] removed leftovers of an interrupted save: {', '.join(removed)}")
        run_complete = os.path.join(out, RUN_COMPLETE)
        if os.path.exists(run_complete):
            os.remove(run_complete)
        root = checkpoint_root(out)
        if os.path.dirname(checkpoint_dir) == os.path.abspath(root):
            # --resume_from an older checkpoint of this directory: it becomes the newest valid one
            write_text_atomic(os.path.join(root, LATEST), os.path.basename(checkpoint_dir))
    barrier()
    print_rank_0(f"[resume] continuing from {checkpoint_dir} (step {meta['step']}, written by "
                 f"{meta['world_size']} rank(s); this run has {world_size})")
    return ResumePlan(checkpoint_dir, meta, loop_state, universal_engines, world_size)


def mark_run_complete(output_dir, info):
    """After a barrier, rank 0 writes `<output_dir>/run_complete.json` (atomically): the marker
    that makes the finished-run guard refuse this directory."""
    barrier()
    if get_rank() == 0:
        write_json_atomic(os.path.join(output_dir, RUN_COMPLETE),
                          {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})
    barrier()


# ----------------------------------------------------------------------------------------------
# The loop's side: when to save, SIGTERM
# ----------------------------------------------------------------------------------------------

class StopSignal:
    """SIGTERM sets a flag; `requested()` all-reduces it, so every rank stops at the same step
    boundary (the launcher signals one rank after another, and schedulers may signal just one)."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum, frame):
        if not self.flag:
            print(f"[checkpoint] rank {get_rank()}: SIGTERM, saving at the next step boundary",
                  flush=True)
        self.flag = True

    def requested(self):
        return all_reduce_sum([1.0 if self.flag else 0.0])[0] > 0


class Checkpointer:
    """When a loop saves: every `save_steps`, at the end, and when it must stop (SIGTERM on any
    rank, or the hidden `--stop_after_steps`).

        checkpointer = Checkpointer(args.output_dir, {"actor": actor, "critic": critic}, args,
                                    metric_name="eval/reward", higher_is_better=True)
        for ...:                                 # at each optimizer-step boundary, every rank:
            if checkpointer.step_end(step, state.to_dict(), metric=last_eval):
                return                           # saved; stop cleanly
        checkpointer.save(step, state.to_dict(), metric=last_eval)   # the end
    """

    def __init__(self, output_dir, engines, args, metric_name=None, higher_is_better=False,
                 resumed_step=None):
        self.output_dir = output_dir
        self.engines = engines
        self.save_steps = getattr(args, "save_steps", 0) or 0
        self.keep = getattr(args, "keep_checkpoints", 0) or 0
        self.stop_after_steps = getattr(args, "stop_after_steps", None)
        self.metric_name = metric_name
        self.higher_is_better = higher_is_better
        self.last_saved_step = resumed_step   # the checkpoint a resume started from
        self.stop_reason = None
        self.signal = StopSignal().install()

    def metric(self, last_eval):
        """{"name", "value", "step", "higher_is_better"} from an evaluation record
        {"step": s, <metric_name>: v, ...}, or None."""
        if not last_eval or self.metric_name not in last_eval:
            return None
        return {"name": self.metric_name, "value": float(last_eval[self.metric_name]),
                "step": last_eval.get("step"), "higher_is_better": self.higher_is_better}

    def step_end(self, step, loop_state, last_eval=None):
        """Every rank, at each optimizer-step boundary: saves when due; True when the loop must
        stop (after saving)."""
        if self.signal.requested():
            self.stop_reason = "SIGTERM"
        elif self.stop_after_steps is not None and step >= self.stop_after_steps:
            self.stop_reason = f"--stop_after_steps {self.stop_after_steps}"
        if self.stop_reason or (self.save_steps and step % self.save_steps == 0):
            self.save(step, loop_state, last_eval)
        if self.stop_reason:
            print_rank_0(f"[checkpoint] stopped at step {step} ({self.stop_reason}); continue "
                         f"with --resume --output_dir {self.output_dir}")
        return self.stop_reason is not None

    def save(self, step, loop_state, last_eval=None):
        """Save (once per step); returns the checkpoint directory."""
        if step != self.last_saved_step:
            save_training_checkpoint(self.output_dir, step, self.engines, loop_state,
                                     self.metric(last_eval), self.keep)
            self.last_saved_step = step
        return os.path.join(checkpoint_root(self.output_dir), checkpoint_name(step))

    def close(self):
        self.signal.uninstall()
