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


def run_stage(stage, args, num_gpus=1, timeout=600, script="main.py", launcher=True):
    """Run `deepspeed --num_gpus N <stage>/<script> args` (or `python <script> args` without the
    launcher); return the combined output. Raises AssertionError with the output tail on failure.
    """
    script_path = os.path.join(ROOT, STAGES[stage], script)
    if launcher:
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
               script_path]
    else:
        cmd = [sys.executable, script_path]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"stage {stage} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout


def cache_dir(output_dir):
    return os.path.join(output_dir, "data_cache")


def sft_args(model_path, data_path, out, zero_stage, extra=()):
    return ["--model_name_or_path", model_path, "--data_path", data_path, "--data_split", "6,2,2",
            "--data_output_path", cache_dir(out), "--output_dir", out, "--max_seq_len", 64,
            "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16,
            "--learning_rate", 3e-3, "--num_train_epochs", 2, "--num_warmup_steps", 2,
            "--zero_stage", zero_stage, "--evals_per_epoch", 2, "--deepspeed", *extra]


def reward_args(model_path, data_path, out, zero_stage, pad_at_beginning, extra=()):
    return ["--model_name_or_path", model_path, "--data_path", data_path, "--data_split", "2,6,2",
            "--data_output_path", cache_dir(out), "--output_dir", out, "--max_seq_len", 64,
            "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 15,
            "--learning_rate", 1e-3, "--weight_decay", 0.1, "--num_train_epochs", 2,
            "--zero_stage", zero_stage, "--evals_per_epoch", 1,
            "--num_padding_at_beginning", pad_at_beginning, "--deepspeed", *extra]


def remax_args(actor_path, reward_path, data_path, out, actor_zero, ref_zero, reward_zero,
               pad_at_beginning, extra=()):
    return ["--actor_model_name_or_path", actor_path, "--reward_model_name_or_path", reward_path,
            "--data_path", data_path, "--data_split", "2,2,6", "--data_output_path",
            cache_dir(out), "--output_dir", out, "--max_prompt_seq_len", 32,
            "--max_answer_seq_len", 12, "--per_device_generation_batch_size", 4,
            "--per_device_training_batch_size", 4, "--per_device_eval_batch_size", 8,
            "--actor_learning_rate", 1e-5, "--num_warmup_steps", 0, "--kl_ctl", 0.05,
            "--gamma", 0.99, "--seed", 1, "--actor_zero_stage", actor_zero,
            "--reference_zero_stage", ref_zero, "--reward_zero_stage", reward_zero,
            "--num_padding_at_beginning", pad_at_beginning, "--eval_batches", 2,
            "--ppl_eval_batches", 2, "--evals_per_epoch", 2, "--enable_test_mode",
            "--test_stop_step", 4, "--disable_actor_dropout", "--deepspeed", *extra]
