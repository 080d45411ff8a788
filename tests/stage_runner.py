"""Launch a stage's main.py through the `deepspeed` launcher on the CPU, as users do on GPUs."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {1: "step1_supervised_finetuning", 2: "step2_reward_model_finetuning",
          3: "step3_rlhf_finetuning"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env():
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_stage(stage, args, num_gpus=1, timeout=600, script="main.py"):
    """Run `deepspeed --num_gpus N <stage>/<script> args`; return the combined output.

    Raises AssertionError with the output tail when the run fails.
    """
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
           os.path.join(ROOT, STAGES[stage], script)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"stage {stage} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout
