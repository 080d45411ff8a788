"""One benchmark run: `python step3_rlhf_finetuning/main.py ...` as its own process (world size 1,
no launcher), its output in a log file, and its peak memory: on the CPU the peak resident memory
of that process from the kernel's rusage of the child (os.wait4), not of the benchmark's own
process; on a GPU torch.cuda.max_memory_allocated at its exit (scripts/peak_memory.py)."""
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from demo.stages import launcher_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE3_MAIN = os.path.join(ROOT, "step3_rlhf_finetuning", "main.py")
PEAK_MEMORY_WRAPPER = os.path.join(ROOT, "scripts", "peak_memory.py")
# Evaluations cost a generation each and are not measured: none. main.py accepts 0 today (an
# evaluation of no batches reports zeros); should it start to refuse 0, use 1.
EVAL_BATCHES = 0
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


@dataclass(frozen=True)
class Shape:
    """What every algorithm gets the same of: prompt batch, lengths, steps, ZeRO stages."""
    prompts_per_step: int = 8
    max_prompt_seq_len: int = 32
    max_answer_seq_len: int = 64
    steps: int = 3                  # updates per run; the first is the warm-up, not measured
    trained_zero_stage: int = 2     # actor (and PPO's critic)
    frozen_zero_stage: int = 0      # reference and reward
    data_split: str = "2,4,4"


@dataclass
class ProcessResult:
    returncode: int
    peak_rss_mib: float
    peak_gpu_mib: float     # NaN on the CPU
    wall_seconds: float
    cpu_seconds: float      # user + system time of the process
    log_path: str


def stage3_args(shape, actor_dir, reward_dir, data_dir, data_cache, output_dir, algo_flags,
                batch_size=None, seed=1):
    """Flags of one short stage-3 run: `shape.steps` updates in test mode, EVAL_BATCHES prompt
    batches in the evaluations before training and at the end, no periodic evaluation.
    `data_cache`: the tokenized-data cache the runs share."""
    batch = batch_size or shape.prompts_per_step
    return ["--actor_model_name_or_path", actor_dir, "--reward_model_name_or_path", reward_dir,
            "--data_path", data_dir, "--data_split", shape.data_split,
            "--data_output_path", data_cache,
            "--output_dir", output_dir, "--seed", seed,
            "--max_prompt_seq_len", shape.max_prompt_seq_len,
            "--max_answer_seq_len", shape.max_answer_seq_len,
            "--per_device_generation_batch_size", batch, "--per_device_training_batch_size", batch,
            "--per_device_eval_batch_size", batch, "--num_warmup_steps", 0,
            "--actor_zero_stage", shape.trained_zero_stage,
            "--reference_zero_stage", shape.frozen_zero_stage,
            "--reward_zero_stage", shape.frozen_zero_stage, "--num_padding_at_beginning", 1,
            "--disable_actor_dropout", "--disable_reward_dropout",
            "--eval_batches", EVAL_BATCHES, "--ppl_eval_batches", EVAL_BATCHES,
            "--evals_per_epoch", 1,
            "--enable_test_mode", "--test_stop_step", shape.steps, "--deepspeed", *algo_flags]


def child_env(device):
    """The stages' environment (offline, one rank's threads = all cores) on `device`."""
    env = launcher_env(1)
    env["DS_ACCELERATOR"] = device
    return env


def run_process(args, log_path, device, main_py=STAGE3_MAIN, timeout=900):
    """Run `python main_py args` to completion; its output goes to `log_path`. The peak RSS is the
    child's ru_maxrss (KiB on Linux); on "cuda" the process runs under scripts/peak_memory.py,
    which writes its max_memory_allocated next to the log. A run past `timeout` s is killed."""
    env = child_env(device)
    cmd = [sys.executable, main_py] + [str(a) for a in args]
    stats_path = log_path[:-len(".log")] + ".peak_memory.json"
    if device == "cuda":
        if not os.path.exists(PEAK_MEMORY_WRAPPER):
            raise FileNotFoundError(f"{PEAK_MEMORY_WRAPPER} is missing: no way to read the peak "
                                    "GPU memory of a run")
        cmd.insert(1, PEAK_MEMORY_WRAPPER)
        env["SMOKE_STATS_FILE"] = stats_path
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
    return ProcessResult(proc.returncode, usage.ru_maxrss / 1024.0, gpu_peak_mib(stats_path),
                         time.time() - start, usage.ru_utime + usage.ru_stime, log_path)


def gpu_peak_mib(stats_path):
    """max_memory_allocated from scripts/peak_memory.py's JSON in MiB; NaN when absent."""
    try:
        with open(stats_path) as f:
            allocated = json.load(f).get("max_memory_allocated")
    except (OSError, ValueError):
        return math.nan
    return allocated / 2 ** 20 if allocated is not None else math.nan


def log_tail(path, chars=3000):
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def ran_out_of_memory(path):
    """Whether the log of a failed run shows an accelerator out-of-memory error."""
    with open(path, errors="replace") as f:
        text = f.read()
    return any(marker in text for marker in OOM_MARKERS)
