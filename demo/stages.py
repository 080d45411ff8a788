"""Run a stage's main.py through the `deepspeed` launcher, as a GPU run would, on the CPU.

The stage's whole output goes to a log file; its rank-0 progress bars are echoed to the terminal.
"""
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_DIRS = {1: "step1_supervised_finetuning", 2: "step2_reward_model_finetuning",
              3: "step3_rlhf_finetuning"}
# The descriptions utils.training.progress gives the stages' bars.
_BAR = re.compile(r"^(perplexity|reward|remax) epoch .*\|")


class StageFailed(RuntimeError):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(num_ranks):
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // num_ranks)  # no oversubscription across ranks
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def launcher_command(stage, args, num_ranks):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
            os.path.join(ROOT, STAGE_DIRS[stage], "main.py")] + [str(a) for a in args]


def run_stage(stage, args, num_ranks, log_path, echo=True):
    """`deepspeed --num_gpus N <stage>/main.py args`; the output goes to `log_path`, progress bars
    to the terminal. Returns the wall seconds; raises StageFailed naming the log on failure."""
    cmd = launcher_command(stage, args, num_ranks)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(num_ranks), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        bar_shown = False
        for line in _lines(proc.stdout):
            log.write(line + "\n")
            text = _strip_launcher_prefix(line)
            if echo and _BAR.match(text):
                sys.stdout.write("\r  " + text[:110].ljust(110))
                sys.stdout.flush()
                bar_shown = True
        rc = proc.wait()
    if echo and bar_shown:
        sys.stdout.write("\n")
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise StageFailed(f"stage {stage} failed (exit {rc}); full log: {log_path}\n{tail}")
    return time.time() - start


def _lines(stream):
    """Lines of a byte stream split at \\n and at tqdm's \\r."""
    buffer = b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        buffer += chunk
        parts = re.split(rb"[\r\n]", buffer)
        buffer = parts.pop()
        for part in parts:
            if part:
                yield part.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def _strip_launcher_prefix(line):
    # The launcher prefixes nothing on CPU today; tolerate "[rank0]: " should it start to.
    return re.sub(r"^\[rank\d+\]:\s*", "", line)
