"""Launch a stage's main.py through the `deepspeed` launcher on the CPU, as users do on GPUs.

Every run gets its own output directory (a stage refuses one that holds a finished run unless
--resume or --overwrite_output_dir); the resume tests reuse theirs with --resume.
"""
import os
import signal
import socket
import subprocess
import sys
import time

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


def stage_command(stage, args, num_gpus=1, script="main.py", launcher=True):
    script_path = os.path.join(ROOT, STAGES[stage], script)
    if launcher:
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
               script_path]
    else:
        cmd = [sys.executable, script_path]
    return cmd + [str(a) for a in args]


def leaked_shm_buffers(cmd):
    """DeepSpeed's CPU shared-memory all-reduce files still in /dev/shm for the launcher's port
    (init_distributed unlinks them; a leak costs 66 MB of RAM per rank until reboot)."""
    if "--master_port" not in cmd:
        return []
    port = cmd[cmd.index("--master_port") + 1]
    suffix = f"_{port}_"
    return [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and suffix in f]


def run_command(cmd, env=None, timeout=600):
    """Run `cmd` in its own process group; return (returncode, combined output). On a timeout the
    launcher and every rank are killed (subprocess.run's timeout would orphan the ranks) and the
    test fails with the output so far. A run that leaks a /dev/shm all-reduce buffer fails too."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**launcher_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd[:4])}\n{output[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # a rank the launcher left behind
        except ProcessLookupError:
            pass
    leaked = leaked_shm_buffers(cmd)
    for name in leaked:
        os.unlink(os.path.join("/dev/shm", name))
    assert not leaked, f"the run left {leaked} in /dev/shm"
    return proc.returncode, output


def run_stage(stage, args, num_gpus=1, timeout=600, script="main.py", launcher=True, env=None):
    """Run `deepspeed --num_gpus N <stage>/<script> args` (or `python <script> args` without the
    launcher); return the combined output. Raises AssertionError with the output tail on failure.
    `env`: extra environment variables.
    """
    returncode, output = run_command(stage_command(stage, args, num_gpus, script, launcher), env, timeout)
    if returncode != 0:
        raise AssertionError(f"stage {stage} failed (rc {returncode}):\n{output[-6000:]}")
    return output


def run_two_nodes(stage, args, hostfile, timeout=600, cwds=(ROOT, ROOT)):
    """Run a stage as two "nodes" of one rank each on this host: the launcher's multi-node mode
    without ssh (`--hostfile` naming two hosts, `--no_ssh --node_rank i`), one launcher per node,
    as a cluster's scheduler starts them. `cwds`: each node's working directory. Returns
    [(returncode, output)] for node 0 and node 1; a timeout kills both and fails."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    script = os.path.join(ROOT, STAGES[stage], "main.py")
    port = str(free_port())
    procs = [subprocess.Popen([deepspeed, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", port, script,
                               *[str(a) for a in args]],
                              cwd=cwd, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for node, cwd in enumerate(cwds)]
    deadline = time.time() + timeout
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=max(1, deadline - time.time()))
            results.append((proc.returncode, output))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"two-node run timed out after {timeout} s:\n" +
                             "\n".join(r[1][-3000:] for r in results))
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return results


class BackgroundStage:
    """A stage run in the background, in its own process group (so the launcher and every rank
    can be killed at once), its output in `log_path`."""

    def __init__(self, stage, args, num_gpus, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(stage_command(stage, args, num_gpus), cwd=ROOT,
                                     env={**launcher_env(), **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait_until(self, condition, timeout=300, what="the condition"):
        """Poll `condition()` every 20 ms; AssertionError if the run ends or time runs out first."""
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before "
                                     f"{what}:\n{self.output()[-4000:]}")
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.02)

    def rank_pid(self, rank):
        """The pid of the rank process the launcher started with --local_rank=<rank>."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if f"--local_rank={rank}" in child.cmdline():
                return child.pid
        raise AssertionError(f"no process of rank {rank}")

    def kill(self):
        """SIGKILL the launcher and every rank at once."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def wait(self, timeout=600):
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc


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


def assert_same_training(reference, resumed):
    """Two runs' metric records (every train step, every evaluation) and exported weights (every
    top-level *.safetensors file) are equal, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from utils.training import read_metrics

    expected, got = read_metrics(reference), read_metrics(resumed)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert a == b, f"record {i} differs:\n uninterrupted {a}\n resumed       {b}"
    assert len(got) == len(expected)
    files = sorted(f for f in os.listdir(reference) if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(resumed) if f.endswith(".safetensors"))
    for name in files:
        want, have = (load_file(os.path.join(d, name)) for d in (reference, resumed))
        assert want.keys() == have.keys()
        different = [k for k in want if not torch.equal(want[k], have[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
