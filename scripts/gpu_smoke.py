"""GPU smoke run: what the recipes do, on tiny OPT- and Llama-shaped models, a few steps each, one table.

    bash scripts/gpu_smoke.sh                 # about 5 minutes on a warm node (JIT ops cached)
    bash scripts/gpu_smoke.sh --dry-run       # print the commands, run nothing (no GPU needed)
    bash scripts/gpu_smoke.sh --build-only    # only build the ops a cold node lacks, then stop
    bash scripts/gpu_smoke.sh --only s3-opt-remax-fp16,he-probe-opt --workdir /tmp/smoke

The models (random weights, the project's tiny tokenizers) and the synthetic preference data are built
here from a config: nothing is downloaded. First the DeepSpeed ops the selected cases need (FusedAdam,
CPU Adam, the inference kernels) are built once, each in a child process with its own timeout and
timed (a cold node's JIT builds; not charged to --budget-s). Then each case runs through the deepspeed
launcher on one GPU (two for the -2gpu case, skipped on a one-GPU node) into its own fresh output
directory, and is judged from what it wrote to <out>/metrics.jsonl. The table gives per case:
pass / fail / env-missing / skip, seconds per training step, peak GPU memory (PyTorch's allocator,
the largest over the case's ranks, via scripts/peak_memory.py) and the hybrid-engine check's verdict.
Exit status 1 when any case failed; env-missing (no CUDA, no nvcc/ninja/compiler, a Python package
missing, an op that does not build) is not a failure unless --strict. docs/gpu.md says how to read it.
"""
import argparse
import glob
import json
import math
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STAGE1 = "step1_supervised_finetuning/main.py"
STAGE2 = "step2_reward_model_finetuning/main.py"
STAGE3 = "step3_rlhf_finetuning/main.py"
PEAK_MEMORY = "scripts/peak_memory.py"
PROBE = "scripts/hybrid_engine_probe.py"
PASS, FAIL, ENV_MISSING, SKIP = "pass", "fail", "env-missing", "skip"
DEFAULT_BUDGET_S = 290  # the cases stay under 5 minutes: no case starts after this (op builds aside)
DEFAULT_BUILD_TIMEOUT_S = 900  # per op; a cold build of the inference kernels takes minutes

# Smoke-model shape: head size 64 as in the real OPT/Llama, so DeepSpeed's kernels see usual shapes.
MODEL_SHAPE = {"vocab_size": 512, "hidden_size": 256, "num_layers": 2, "num_heads": 4}
DATA_ROWS = {"num_train": 200, "num_test": 100}  # split 2,4,4: 5 SFT steps, 10 reward steps, 20 prompt batches

# Python modules each case imports (top-level names) and the pip names to install them by. DeepSpeed
# also lists the ninja package, but what its builds run is the ninja binary, checked on its own.
BASE_MODULES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "sentencepiece",
                "deepspeed", "hjson", "cpuinfo", "msgpack", "pydantic", "einops", "psutil",
                "datasets", "pyarrow", "pandas", "dill", "multiprocess", "xxhash", "fsspec", "yaml",
                "huggingface_hub", "tqdm", "numpy", "packaging")
PIP_NAMES = {"cpuinfo": "py-cpuinfo", "yaml": "pyyaml", "huggingface_hub": "huggingface-hub"}
PROJECT_PACKAGES = ("utils", "evaluation", "rlhf_engine", "remax_trainer", "train_state", "trainer",
                    "algorithms", "rl_math", "rounds", "remax_math", "sampling")

# The JIT-built ops the cases use, in build order, and DeepSpeed's builder class of each (the CUDA
# accelerator hands out the CPU builder for cpu_adam: it is host code, compiled without nvcc).
OP_BUILDERS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder",
               "transformer_inference": "InferenceBuilder"}
CPU_OPS = {"cpu_adam"}

# Stage 1 and 2 at smoke sizes (the recipes' schedule and flags, few steps).
SFT_ARGS = ("--data_path", "{data}", "--data_split", "2,4,4", "--data_output_path", "{cache}",
            "--output_dir", "{out}", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--weight_decay", "0.",
            "--num_train_epochs", "1", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0",
            "--gradient_checkpointing", "--evals_per_epoch", "1", "--print_loss", "--deepspeed")
REWARD_ARGS = SFT_ARGS[:SFT_ARGS.index("--learning_rate")] + (
    "--learning_rate", "1e-4", "--weight_decay", "0.1", "--num_train_epochs", "1",
    "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0", "--gradient_checkpointing",
    "--evals_per_epoch", "1", "--print_loss", "--deepspeed")
# Stage 3 at smoke sizes, every algorithm: two updates (--test_stop_step 2), an evaluation before and
# after them, no warm-up (the PPO recipes' 100 warm-up steps would leave the two updates at lr ~0).
STAGE3_ARGS = ("--data_path", "{data}", "--data_split", "2,4,4", "--data_output_path", "{cache}",
               "--output_dir", "{out}", "--per_device_generation_batch_size", "4",
               "--per_device_training_batch_size", "4", "--per_device_eval_batch_size", "4",
               "--generation_batches", "1", "--ppo_epochs", "1", "--max_prompt_seq_len", "32",
               "--max_answer_seq_len", "16", "--num_train_epochs", "1", "--lr_scheduler_type",
               "cosine", "--gradient_accumulation_steps", "1", "--num_warmup_steps", "0",
               "--seed", "2023", "--eval_batches", "2", "--ppl_eval_batches", "2",
               "--evals_per_epoch", "1", "--enable_test_mode", "--test_stop_step", "2", "--deepspeed")
# The flags of step3_rlhf_finetuning/training_scripts/*/run_*.sh (sizes and paths aside).
REMAX_RECIPE = ("--actor_learning_rate", "1e-6", "--actor_weight_decay", "0.1", "--kl_ctl", "0.05",
                "--gamma", "0.99", "--actor_gradient_checkpointing", "--disable_actor_dropout",
                "--disable_reward_dropout", "--actor_zero_stage", "2", "--reward_zero_stage", "3",
                "--reference_zero_stage", "3", "--enable_hybrid_engine", "--print_answers",
                "--save_answers")
OPT_REMAX_ARGS = ("--actor_model_name_or_path", "{outs[s1-opt-fp16-z2]}",
                  "--reward_model_name_or_path", "{outs[s2-opt-fp16-z2]}",
                  "--num_padding_at_beginning", "1") + STAGE3_ARGS + REMAX_RECIPE
LLAMA_REMAX_ARGS = ("--actor_model_name_or_path", "{outs[s1-llama-fp16-z2-offload]}",
                    "--reward_model_name_or_path", "{outs[s2-llama-fp16-z2]}",
                    "--num_padding_at_beginning", "0") + STAGE3_ARGS + REMAX_RECIPE + (
    "--offload", "--offload_reference_model", "--offload_reward_model", "--actor_bf16",
    "--reward_bf16", "--save_at_final")
PPO_RECIPE = ("--algo", "ppo", "--actor_learning_rate", "9.65e-6", "--critic_learning_rate", "5e-6",
              "--disable_actor_dropout", "--enable_hybrid_engine")
# Beyond the recipes, for what the smoke run checks: --save_at_final exports the actor, the EMA and
# the critic whatever the eval reward did.
OPT_PPO_ARGS = ("--actor_model_name_or_path", "{outs[s1-opt-fp16-z2]}",
                "--reward_model_name_or_path", "{outs[s2-opt-fp16-z2]}",
                "--critic_model_name_or_path", "{outs[s2-opt-fp16-z2]}",
                "--num_padding_at_beginning", "1") + STAGE3_ARGS + PPO_RECIPE + (
    "--actor_zero_stage", "2", "--critic_zero_stage", "2", "--reference_zero_stage", "0",
    "--reward_zero_stage", "0", "--enable_ema", "--save_at_final")
# The Llama PPO recipe, plus EMA (here under a ZeRO-3 actor, the EMA copy ZeRO-3 offloaded like the
# reference) and an LM head in several chunks (0.05 MiB: 25 rows of the 512-token vocabulary), so
# the chunk count is all-reduced and the chunks recomputed in the backward.
LLAMA_PPO_ARGS = ("--actor_model_name_or_path", "{outs[s1-llama-fp16-z2-offload]}",
                  "--reward_model_name_or_path", "{outs[s2-llama-fp16-z2]}",
                  "--critic_model_name_or_path", "{outs[s2-llama-fp16-z2]}",
                  "--num_padding_at_beginning", "0") + STAGE3_ARGS + PPO_RECIPE + (
    "--actor_weight_decay", "0.1", "--critic_weight_decay", "0.1", "--actor_gradient_checkpointing",
    "--critic_gradient_checkpointing", "--offload_reference_model", "--actor_zero_stage", "3",
    "--critic_zero_stage", "3", "--reference_zero_stage", "3", "--reward_zero_stage", "3",
    "--enable_ema", "--save_at_final", "--logit_chunk_mib", "0.05")
PPO_OUTPUTS = ("actor/model.safetensors", "actor_ema/model.safetensors", "critic/config.json")


@dataclass(frozen=True)
class Case:
    name: str
    covers: str
    script: str
    args: tuple
    family: str = "opt"
    launcher: bool = True
    gpus: int = 1        # --num_gpus of the launcher; a case needing more than the node has is skipped
    ops: tuple = ()      # DeepSpeed ops it builds: fused_adam, cpu_adam, transformer_inference
    after: tuple = ()    # cases whose outputs it reads
    hybrid: str = "-"    # "on": --enable_hybrid_engine; "forced": the probe; "-": n/a
    # Log text for what neither metrics.jsonl nor the outputs show: which optimizer stepped, the
    # precision the engine trained in, and the output of the scripts that write no metrics.
    expect: tuple = ()
    outputs: tuple = ()  # files (under the case's output directory) the run must write
    timeout_s: int = 150


def fp16_adam(optimizer="FusedAdam", precision="fp16"):
    return (f"[optimizer] {optimizer}", f"[precision] training in {precision}")


CASES = (
    Case("s1-opt-fp16-z2", "stage 1, the OPT recipe: fp16 (loss scaling), ZeRO 2, FusedAdam", STAGE1,
         ("--model_name_or_path", "{tiny_opt}", "--zero_stage", "2") + SFT_ARGS,
         ops=("fused_adam",), expect=fp16_adam()),
    Case("s1-llama-fp16-z2-offload",
         "stage 1, the Llama-2 recipe: fp16, ZeRO 2 + offload (DeepSpeedCPUAdam)", STAGE1,
         ("--model_name_or_path", "{tiny_llama}", "--zero_stage", "2", "--offload") + SFT_ARGS,
         family="llama", ops=("cpu_adam",), expect=fp16_adam("DeepSpeedCPUAdam")),
    Case("s2-opt-fp16-z2", "stage 2, the OPT recipe: reward model, fp16, ZeRO 2, FusedAdam", STAGE2,
         ("--model_name_or_path", "{outs[s1-opt-fp16-z2]}", "--num_padding_at_beginning", "1",
          "--zero_stage", "2") + REWARD_ARGS,
         ops=("fused_adam",), after=("s1-opt-fp16-z2",), expect=fp16_adam()),
    Case("s2-llama-fp16-z2", "stage 2, the Llama-2 recipe: reward model, fp16, ZeRO 2, FusedAdam",
         STAGE2,
         ("--model_name_or_path", "{outs[s1-llama-fp16-z2-offload]}", "--num_padding_at_beginning",
          "0", "--zero_stage", "2") + REWARD_ARGS,
         family="llama", ops=("fused_adam",), after=("s1-llama-fp16-z2-offload",),
         expect=fp16_adam()),
    Case("rw-eval-opt", "rw_eval.py on the stage-2 OPT output (fp16)",
         "step2_reward_model_finetuning/rw_eval.py",
         ("--model_name_or_path", "{outs[s2-opt-fp16-z2]}", "--num_padding_at_beginning", "1",
          "--data_path", "{data}", "--data_split", "2,4,4", "--data_output_path", "{cache}",
          "--max_seq_len", "64", "--batch_size", "8", "--max_batches", "2", "--dtype", "fp16"),
         launcher=False, after=("s2-opt-fp16-z2",), expect=("Eval result",), timeout_s=90),
    Case("prompt-eval-opt", "prompt_eval.py: tiny OPT vs the stage-1 OPT output (fp16)",
         "step1_supervised_finetuning/prompt_eval.py",
         ("--model_name_or_path_baseline", "{tiny_opt}", "--model_name_or_path_finetune",
          "{outs[s1-opt-fp16-z2]}", "--max_new_tokens", "16", "--seed", "1", "--dtype", "fp16"),
         launcher=False, after=("s1-opt-fp16-z2",), expect=("finetune: Greedy",), timeout_s=90),
    Case("s3-opt-remax-fp16",
         "stage 3 ReMax, the OPT recipe: actor ZeRO 2 fp16, reference and reward ZeRO 3, hybrid engine on",
         STAGE3, OPT_REMAX_ARGS, ops=("fused_adam",), after=("s1-opt-fp16-z2", "s2-opt-fp16-z2"),
         hybrid="on", expect=fp16_adam(), timeout_s=200),
    Case("s3-opt-ppo-fp16-ema",
         "stage 3 PPO, the OPT PPO recipe: actor and critic ZeRO 2 fp16, reference and reward ZeRO 0, "
         "EMA, hybrid engine on", STAGE3, OPT_PPO_ARGS, ops=("fused_adam",),
         after=("s1-opt-fp16-z2", "s2-opt-fp16-z2"), hybrid="on", expect=fp16_adam(),
         outputs=PPO_OUTPUTS, timeout_s=200),
    Case("s3-llama-remax-bf16-offload",
         "stage 3 ReMax, the Llama-2 recipe: bf16, actor offloaded (DeepSpeedCPUAdam), reference and "
         "reward ZeRO 3 offloaded, hybrid engine on", STAGE3, LLAMA_REMAX_ARGS, family="llama",
         ops=("cpu_adam",), after=("s1-llama-fp16-z2-offload", "s2-llama-fp16-z2"), hybrid="on",
         expect=fp16_adam("DeepSpeedCPUAdam", "bf16"), outputs=("actor/model.safetensors",),
         timeout_s=200),
    Case("s3-llama-ppo-fp16-z3-ema",
         "stage 3 PPO, the Llama-2 PPO recipe: fp16, actor, critic, reference and reward ZeRO 3 "
         "(reference offloaded), + EMA under the ZeRO-3 actor, LM head in chunks, hybrid engine on",
         STAGE3, LLAMA_PPO_ARGS, family="llama", ops=("fused_adam",),
         after=("s1-llama-fp16-z2-offload", "s2-llama-fp16-z2"), hybrid="on", expect=fp16_adam(),
         outputs=PPO_OUTPUTS, timeout_s=200),
    Case("he-probe-opt", "hybrid engine forced on the tiny OPT (fp16): greedy vs the HF path", PROBE,
         ("--model", "{tiny_opt}", "--precision", "fp16"), ops=("transformer_inference",),
         hybrid="forced", expect=("HYBRID_ENGINE_PROBE",), timeout_s=240),
    Case("he-probe-llama", "hybrid engine forced on the tiny Llama (bf16): greedy vs the HF path",
         PROBE, ("--model", "{tiny_llama}", "--precision", "bf16"), family="llama",
         ops=("transformer_inference",), hybrid="forced", expect=("HYBRID_ENGINE_PROBE",),
         timeout_s=240),
    # Last: on a one-GPU node it is skipped at once; on a larger one the time budget cuts it first.
    Case("s3-llama-ppo-fp16-z3-ema-2gpu",
         "s3-llama-ppo-fp16-z3-ema on 2 GPUs: NCCL all_gather_object (preflight), the chunk-count "
         "all-reduce, synced_gpus generation under the ZeRO-3 actor, ZeRO-3 partitions across ranks",
         STAGE3, LLAMA_PPO_ARGS, family="llama", gpus=2, ops=("fused_adam",),
         after=("s1-llama-fp16-z2-offload", "s2-llama-fp16-z2"), hybrid="on", expect=fp16_adam(),
         outputs=PPO_OUTPUTS, timeout_s=240),
)
CASE_NAMES = tuple(case.name for case in CASES)


@dataclass
class Result:
    case: str
    status: str
    seconds_per_step: float = None
    peak_memory_bytes: int = None
    hybrid: str = "-"
    wall_s: float = None
    note: str = ""


# ------------------------------------------------------------------------------ the commands

def run_paths(workdir, run_dir):
    """Where the inputs and each case's output, cache, log and stats go."""
    models = os.path.join(workdir, "models")
    return {"tiny_opt": os.path.join(models, "tiny-opt"),
            "tiny_llama": os.path.join(models, "tiny-llama"),
            # the dataset adapter is chosen by the path's hub id
            "data_root": os.path.join(workdir, "data"),
            "data": os.path.join(workdir, "data", "Dahoas", "rm-static"),
            "run": run_dir,
            "out": {name: os.path.join(run_dir, name) for name in CASE_NAMES}}


def case_command(case, paths, port):
    """argv of `case`: under the deepspeed launcher (`case.gpus` GPUs) or plain python, via
    peak_memory.py.

    Argument templates name {out} / {cache} (the case's own), {outs[<case>]} (another case's
    output), {data}, {tiny_opt} and {tiny_llama}."""
    fields = {"out": paths["out"][case.name], "cache": os.path.join(paths["run"], "cache", case.name),
              "outs": paths["out"], "data": paths["data"], "tiny_opt": paths["tiny_opt"],
              "tiny_llama": paths["tiny_llama"]}
    args = [a.format(**fields) for a in case.args]
    if case.launcher:
        prefix = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(case.gpus),
                  "--master_port", str(port)]
    else:
        prefix = [sys.executable]
    return prefix + [PEAK_MEMORY, case.script] + args


def build_command(op):
    """argv of the child process that builds (or loads from the JIT cache) one DeepSpeed op."""
    return [sys.executable, "scripts/gpu_smoke.py", "--build-op", op]


# ------------------------------------------------------------------------------ the environment

def probe_environment():
    """What this machine has for the smoke run, as a dict. Runs in a child process (`--env-json`),
    so the parent never holds a CUDA context of its own."""
    import importlib.util

    report = {"python": sys.version.split()[0]}
    report["missing_modules"] = [m for m in BASE_MODULES if importlib.util.find_spec(m) is None]
    try:
        import torch
        import torch.utils.cpp_extension as cpp
    except ImportError as err:
        report.update(cuda=False, cuda_note=f"torch does not import: {err}")
        return report
    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    report["cuda"] = torch.cuda.is_available()
    report["gpu_count"] = torch.cuda.device_count() if report["cuda"] else 0
    if report["cuda"]:
        report["gpu"] = torch.cuda.get_device_name(0)
        report["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    else:
        report["cuda_note"] = ("torch has no CUDA build" if torch.version.cuda is None
                               else "no CUDA device visible")
    report["ninja"] = cpp.is_ninja_available()
    report["cxx"] = shutil.which(os.environ.get("CXX", "c++"))
    report["cuda_home"] = cpp.CUDA_HOME
    nvcc = os.path.join(cpp.CUDA_HOME, "bin", "nvcc") if cpp.CUDA_HOME else shutil.which("nvcc")
    report["nvcc"] = nvcc if nvcc and os.path.exists(nvcc) else None
    if "deepspeed" not in report["missing_modules"]:
        try:
            os.environ["DS_ACCELERATOR"] = "cuda" if report["cuda"] else "cpu"  # as the cases run
            import deepspeed
            from deepspeed.git_version_info import accelerator_name, installed_ops

            report["deepspeed"] = deepspeed.__version__
            # DeepSpeed loads a prebuilt op only if it was built for this accelerator (a wheel built
            # on a CPU machine JIT-builds everything on the GPU node).
            report["prebuilt_ops"] = sorted(op for op, built in installed_ops.items()
                                            if built and accelerator_name == "cuda")
        except Exception as err:  # noqa: BLE001 - a broken install is an environment finding
            report["deepspeed_error"] = f"{type(err).__name__}: {err}"
    if report.get("nvcc") and torch.version.cuda and report.get("deepspeed"):
        try:
            from deepspeed.ops.op_builder.builder import assert_no_cuda_mismatch, installed_cuda_version

            report["nvcc_release"] = "%d.%d" % installed_cuda_version()
            assert_no_cuda_mismatch()
        except Exception as err:  # noqa: BLE001 - DeepSpeed's own verdict on the toolkit
            report["cuda_mismatch"] = f"{type(err).__name__}: {err}"
    if report.get("deepspeed"):
        report["hybrid_check"] = static_hybrid_verdicts()
    return report


def static_hybrid_verdicts():
    """{family: [compatible, reason]} of utils/hybrid_engine_check.py on the smoke models' configs."""
    from utils.hybrid_engine_check import hybrid_engine_layer_contract
    from utils.model.tiny_models import _model_config

    verdicts = {}
    for family in ("opt", "llama"):
        config = _model_config(family, MODEL_SHAPE["vocab_size"], MODEL_SHAPE["hidden_size"],
                               MODEL_SHAPE["num_layers"], MODEL_SHAPE["num_heads"], 512)
        verdicts[family] = list(hybrid_engine_layer_contract(config))
    return verdicts


def environment_report():
    """probe_environment() from a child process (the parent never initialises CUDA)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--env-json"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          env=child_env({}))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"cuda": False, "cuda_note": f"the environment probe failed: {proc.stderr[-500:]}",
                "missing_modules": []}
    return json.loads(lines[-1])


def ops_needed(case, env):
    """The ops `case` builds here: its own, plus the inference kernels when it asks for the hybrid
    engine on a family the check passes (an enabled hybrid engine always builds them; after the
    fallback there is no hybrid engine)."""
    ops = set(case.ops)
    verdict = env.get("hybrid_check", {}).get(case.family)
    if case.hybrid == "on" and verdict and verdict[0]:
        ops.add("transformer_inference")
    return ops


def gpu_shortage(case, env):
    """The skip note of a case that needs more GPUs than the node has, or None."""
    have = env.get("gpu_count", 1)
    if case.gpus > have:
        return f"needs {case.gpus} GPUs, the node has {have}"
    return None


def env_missing_reason(case, env):
    """Why `case` cannot run on this machine, or None."""
    missing = env.get("missing_modules", [])
    if missing:
        names = " ".join(PIP_NAMES.get(m, m) for m in missing)
        return f"missing Python packages: {names} (carry wheels: pip install --no-deps wheels/*.whl)"
    if not env.get("cuda"):
        return env.get("cuda_note", "no CUDA device")
    if env.get("deepspeed_error"):
        return f"deepspeed does not import: {env['deepspeed_error']}"
    to_build = ops_needed(case, env) - set(env.get("prebuilt_ops", []))
    if not to_build:
        return None
    lacks = []
    if not env.get("ninja"):
        lacks.append("ninja")
    if not env.get("cxx"):
        lacks.append("a C++ compiler")
    cuda_ops = to_build - CPU_OPS
    if cuda_ops and not env.get("nvcc"):
        lacks.append("nvcc (a CUDA toolkit; CUDA_HOME)")
    if lacks:
        return f"cannot build {', '.join(sorted(to_build))}: no {', no '.join(lacks)}"
    if cuda_ops and env.get("cuda_mismatch"):
        return f"cannot build {', '.join(sorted(cuda_ops))}: {env['cuda_mismatch']}"
    return None


# ------------------------------------------------------------------------------ the op builds
# DeepSpeed JIT-builds an op the first time a process loads it (minutes on a cold node, the inference
# kernels the longest) and caches it under ~/.cache/torch_extensions ($TORCH_EXTENSIONS_DIR). Built
# here once, before the cases, each in a child with the cases' environment (DS_ACCELERATOR,
# TORCH_CUDA_ARCH_LIST: the same flags, so the cases load the cached build) and its own timeout:
# a build neither eats a case's timeout nor races between the ranks of a 2-GPU case.

BUILD_PREFIX = "SMOKE_BUILD "
BUILT, CACHED, BUILD_FAILED, BUILD_TIMED_OUT = "built", "cached", "failed", "timed out"


@dataclass
class Build:
    op: str
    status: str          # built (JIT-compiled now), cached (loaded from the JIT cache), failed, timed out
    seconds: float = None
    note: str = ""


def jit_cache_has(name):
    """Whether torch's JIT cache already holds a build of `name` (None when it cannot tell)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.exists(os.path.join(_get_build_directory(name, verbose=False), name + ".so"))
    except Exception:  # noqa: BLE001 - a private helper of torch; only for the label
        return None


def build_op(op):
    """In the child (`--build-op`): load `op` through DeepSpeed's builder, which JIT-builds it when
    it is not cached; prints one BUILD_PREFIX line of JSON. Exit status 0 when it loaded."""
    report = {"op": op}
    start = time.time()
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder(OP_BUILDERS[op])
        if builder is None:
            raise RuntimeError(f"the {get_accelerator().device_name()} accelerator has no "
                               f"{OP_BUILDERS[op]}")
        report["cached_before"] = jit_cache_has(builder.name)
        builder.load(verbose=True)
        report["ok"] = True
    except Exception as err:  # noqa: BLE001 - reported to the parent, which marks the cases
        report.update(ok=False, error=f"{type(err).__name__}: {err}"[:500])
    report["seconds"] = round(time.time() - start, 1)
    print(BUILD_PREFIX + json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def ops_to_build(planned, env):
    """The ops, in build order, that the cases about to run need and the install does not ship."""
    prebuilt = set(env.get("prebuilt_ops", []))
    needed = set()
    for case, _, skip in planned:
        if skip or env_missing_reason(case, env) or gpu_shortage(case, env):
            continue
        needed |= ops_needed(case, env) - prebuilt
    return [op for op in OP_BUILDERS if op in needed]


def build_result(op, returncode, log, seconds, timed_out, timeout_s):
    """The Build of one child's run."""
    if timed_out:
        return Build(op, BUILD_TIMED_OUT, seconds,
                     f"not built in {timeout_s:.0f}s; raise --build-timeout-s or rerun (ninja keeps "
                     "what it compiled)")
    lines = [line for line in log.splitlines() if line.startswith(BUILD_PREFIX)]
    try:
        report = json.loads(lines[-1][len(BUILD_PREFIX):]) if lines else {}
    except ValueError:
        report = {}
    if returncode == 0 and report.get("ok"):
        return Build(op, CACHED if report.get("cached_before") else BUILT, seconds)
    reason = report.get("error") or env_failure(log) or f"exit status {returncode}"
    return Build(op, BUILD_FAILED, seconds, reason)


def build_ops(ops, paths, env_extra, timeout_s):
    """Build each op in its own child; {op: Build}. Prints one line per op as it finishes."""
    builds = {}
    for op in ops:
        log_path = os.path.join(paths["run"], "logs", f"build-{op}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        print(f"[build] {op}: building or loading (timeout {timeout_s:.0f}s) ...", flush=True)
        returncode, log, seconds, timed_out = run_logged(build_command(op), log_path,
                                                         child_env(env_extra), timeout_s)
        builds[op] = build_result(op, returncode, log, seconds, timed_out, timeout_s)
        print(format_build(builds[op]), flush=True)
    return builds


def format_build(build):
    """The build line, e.g. `[build] fused_adam: built in 47s (JIT build, now cached)`."""
    what = {BUILT: "built in {s:.0f}s (JIT build, now cached)",
            CACHED: "loaded from the JIT cache in {s:.0f}s",
            BUILD_FAILED: "failed after {s:.0f}s",
            BUILD_TIMED_OUT: "timed out after {s:.0f}s"}[build.status]
    line = f"[build] {build.op}: " + what.format(s=build.seconds or 0)
    return line + (f": {build.note}" if build.note else "")


def build_problem(case, env, builds):
    """(status, note) of a case one of whose ops did not build, or None."""
    for op in sorted(ops_needed(case, env)):
        build = builds.get(op)
        if build is None or build.status in (BUILT, CACHED):
            continue
        where = f"logs/build-{op}.log"
        if build.status == BUILD_TIMED_OUT:
            return SKIP, f"the {op} build did not finish: {build.note} ({where})"
        return ENV_MISSING, f"building {op} failed: {build.note} ({where})"
    return None


# ------------------------------------------------------------------------------ the verdicts

STEP_LATENCY = re.compile(r"Latency: ([0-9.]+)s, TFLOPs")
ENV_FAILURE_MARKERS = ("Error building extension", "Unable to JIT load", "MissingCUDAException",
                       "CUDA_HOME does not exist", "CUDAMismatchException",
                       "ninja is required to load C++ extensions")
MISSING_MODULE = re.compile(r"No module named '([A-Za-z0-9_]+)")
FALLBACK_WARNING = "--enable_hybrid_engine is ignored"
DS_NO_POLICY = "No compatible DeepSpeed inference policy found"
# DeepSpeed prints each engine's config on rank 0; only an actor with the hybrid engine on has this.
HYBRID_ENGINE_ON = re.compile(r"hybrid_engine \.+ enabled=True")
PROBE_PREFIX = "HYBRID_ENGINE_PROBE "


def seconds_per_step(log, records=None):
    """Median step latency (the first step, with its warm-up, left out), or None: stage 3's
    `train/e2e_seconds` from its metrics, else the latencies a stage printed (stage 1/2
    `--print_loss` lines)."""
    values = [r["train/e2e_seconds"] for r in records or () if is_finite(r.get("train/e2e_seconds"))]
    if not values:
        values = [float(v) for v in STEP_LATENCY.findall(log)]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


# A run is judged by what it recorded in <out>/metrics.jsonl (utils/training.py's MetricsLog, rank 0),
# not by its log text: the records say whether training ran, how many updates and whether the numbers
# are finite. Stages 1 and 2 log `Train/loss` per step and their evaluation (`Test/ppl`, `Test/loss`;
# `Test/acc`, `Test/reward_score`, `Test/rejected_score`) before training and at the epoch's end;
# stage 3 one `train/*` record per update (step 0, 1, ...), an `eval/*` record before training and
# after it, and, for an update whose optimizer step was skipped, a record of the same step with the
# cumulative `train/overflow_skipped` (fp16 loss scaling) and `train/nonfinite_skipped` counters.
EVAL_KEYS = {1: ("Test/ppl",), 2: ("Test/acc", "Test/reward_score")}
STAGES = {STAGE1: 1, STAGE2: 2, STAGE3: 3}


def is_finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def case_flag(case, flag, default=None):
    return case.args[case.args.index(flag) + 1] if flag in case.args else default


def load_metrics(out_dir):
    """(records of <out_dir>/metrics.jsonl, problem or None)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None, "no metrics.jsonl in the output directory"
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))  # Python's json reads NaN and Infinity
            except ValueError:
                return None, f"metrics.jsonl line {number} is not JSON"
    return records, None


def bad_value(records, keys, what):
    """The first record lacking one of `keys` or holding a non-finite one, as a problem text."""
    for record in records:
        for key in keys:
            if not is_finite(record.get(key)):
                value = "missing" if key not in record else record[key]
                return f"{key} is {value} at {what} {record.get('step')}"
    return None


def supervised_metrics_problem(records, eval_keys, prefix="Train"):
    """Stage 1/2: finite `Train/loss` at every step, every evaluation finite in `eval_keys`, one
    evaluation after the last step, no update skipped for a non-finite loss; problem or None."""
    train = [r for r in records if f"{prefix}/loss" in r]
    if not train:
        return f"no {prefix}/loss record: no training step was logged"
    problem = bad_value(train, (f"{prefix}/loss",), "step")
    if problem:
        return problem
    nonfinite = max((r.get(f"{prefix}/nonfinite_skipped", 0) for r in records), default=0)
    if nonfinite:
        return f"{nonfinite} update(s) skipped for a non-finite loss"
    evals = [r for r in records if any(key in r for key in eval_keys)]
    if not evals:
        return f"no evaluation ({', '.join(eval_keys)}) was logged"
    problem = bad_value(evals, eval_keys, "step")
    if problem:
        return problem
    if max(r["step"] for r in evals) < max(r["step"] for r in train):
        return "no evaluation after the last training step"
    return None


def rlhf_metrics_problem(records, test_stop_step, critic):
    """Stage 3 with --enable_test_mode: (problem or None, note). One training record per update, for
    steps 0, 1, ... with none missing; `test_stop_step` of them applied (the test mode stops after
    that many updates DeepSpeed did not skip; an fp16-overflow skip comes on top of them and is only
    noted); finite `train/reward` and `train/actor_loss` (and `train/critic_loss` with a critic) in
    each; no update skipped for a non-finite loss; every `eval/reward` finite, one after training."""
    train = [r for r in records if "train/reward" in r or "train/actor_loss" in r]
    if not train:
        return "no train/reward record: no update was logged", ""
    steps = [r.get("step") for r in train]
    if steps != list(range(len(steps))):
        numbered = [s for s in steps if isinstance(s, int)]
        missing = sorted(set(range(max(numbered, default=-1) + 1)) - set(steps))
        what = f"update {missing[0]} is missing" if missing else "an update is logged twice"
        return f"training records for steps {steps}: {what}", ""
    keys = ("train/reward", "train/actor_loss") + (("train/critic_loss",) if critic else ())
    problem = bad_value(train, keys, "update")
    if problem:
        return problem, ""
    skips = [r for r in records if "train/overflow_skipped" in r or "train/nonfinite_skipped" in r]
    nonfinite = max((r.get("train/nonfinite_skipped", 0) for r in skips), default=0)
    if nonfinite:
        return f"{nonfinite} update(s) skipped for a non-finite loss", ""
    skipped = {r.get("step") for r in skips}
    applied = [s for s in steps if s not in skipped]
    if len(applied) != test_stop_step:
        return (f"{len(applied)} applied update(s) logged ({len(steps)} in all), "
                f"--test_stop_step is {test_stop_step}"), ""
    evals = [r for r in records if "eval/reward" in r]
    if not evals:
        return "no eval/reward record: no evaluation was logged", ""
    problem = bad_value(evals, ("eval/reward",), "step")
    if problem:
        return problem, ""
    if not any(r["step"] >= len(steps) for r in evals):
        return "no evaluation after the last update", ""
    overflow = len(steps) - len(applied)
    return None, f"{len(applied)} updates" + (f" (+{overflow} skipped for fp16 overflow)" if overflow else "")


def metrics_verdict(case, out_dir):
    """(problem or None, note, records) of a finished training case from its metrics.jsonl;
    (None, "", None) for a case that writes none (the eval scripts, the probes)."""
    stage = STAGES.get(case.script)
    if stage is None:
        return None, "", None
    records, problem = load_metrics(out_dir) if out_dir else (None, "no output directory")
    if problem:
        return problem, "", records
    if stage == 3:
        problem, note = rlhf_metrics_problem(records, int(case_flag(case, "--test_stop_step", 0)),
                                             critic=case_flag(case, "--algo") == "ppo")
        return problem, note, records
    return supervised_metrics_problem(records, EVAL_KEYS[stage]), "", records


def env_failure(log):
    """The environment problem a failed run's log shows (a build failure, a missing package), or None."""
    for marker in ENV_FAILURE_MARKERS:
        if marker in log:
            return marker
    for module in MISSING_MODULE.findall(log):
        if module.split(".")[0] not in PROJECT_PACKAGES:
            return f"No module named '{module}'"
    return None


def probe_result(log):
    lines = [line for line in log.splitlines() if line.startswith(PROBE_PREFIX)]
    return json.loads(lines[-1][len(PROBE_PREFIX):]) if lines else None


def hybrid_column(case, log, static):
    """(verdict text, problem or None) for the hybrid-engine column.

    static: [compatible, reason] of the check for the case's family, or None when unknown."""
    if case.hybrid == "-":
        return case.hybrid, None
    if case.hybrid == "forced":
        result = probe_result(log)
        if result is None:
            return "probe: no verdict", None
        check = "check: compatible" if result["static_compatible"] else "check: incompatible"
        info = result.get("info") or {}
        if result.get("env_error") or result.get("probe_error"):
            runtime = "no runtime verdict"
        elif result.get("runtime_ok"):
            runtime = "kernels match HF"
        elif "error" in info:
            runtime = "kernels crash: " + info["error"].split(" raised ")[-1][:60]
        else:
            runtime = f"kernels diverge at token {info.get('position')}"
        return f"{check}; {runtime}", None
    if FALLBACK_WARNING in log:
        return "fallback to HF generate (check: incompatible)", None
    if not HYBRID_ENGINE_ON.search(log):
        return "not reached", None
    if DS_NO_POLICY in log:
        return "HF generate (DeepSpeed has no policy)", None
    if static is not None and not static[0]:
        return ("kernels on, check says incompatible",
                "the hybrid engine ran although the check says incompatible: is model_path passed "
                "to resolve_hybrid_engine?")
    return "kernels on (check: compatible)", None


def judge(case, returncode, log, static, out_dir=None, timed_out=False, budget_stop=False):
    """(status, hybrid column, note) of a finished case.

    A training case passes on its metrics.jsonl (metrics_verdict) and the files it must write; the
    log text is read only for what those cannot show: `case.expect` (the optimizer that stepped, the
    precision line; the eval scripts' and the probes' output, which write no metrics) and the
    hybrid-engine column (the fallback warning, the engine's config line)."""
    hybrid, problem = hybrid_column(case, log, static)
    if budget_stop:
        return SKIP, hybrid, f"stopped at the time budget; rerun with --only {case.name}"
    if timed_out:
        return FAIL, hybrid, "timed out"
    if returncode != 0:
        if case.hybrid == "forced" and returncode in (2, 3):
            result = probe_result(log) or {}
            if returncode == 3:
                return ENV_MISSING, hybrid, result.get("env_error", "could not build DeepSpeed's ops")[:200]
            return FAIL, hybrid, result.get("probe_error", "the probe could not run")[:200]
        reason = env_failure(log)
        if reason:
            return ENV_MISSING, hybrid, reason
        return FAIL, hybrid, problem or f"exit status {returncode}"
    metrics_problem, note, _ = metrics_verdict(case, out_dir)
    if metrics_problem:
        return FAIL, hybrid, f"metrics: {metrics_problem}"
    absent = [p for p in case.outputs if not (out_dir and os.path.exists(os.path.join(out_dir, p)))]
    if absent:
        return FAIL, hybrid, f"no {absent[0]} in the output directory"
    missing = [text for text in case.expect if text not in log]
    if missing:
        return FAIL, hybrid, f"log lacks {missing[0]!r}"
    if problem:
        return FAIL, hybrid, problem
    return PASS, hybrid, note


def exit_code(results, strict=False):
    """1 when any case failed; with `strict`, 2 when none failed but some could not run."""
    statuses = {r.status for r in results}
    if FAIL in statuses:
        return 1
    if strict and ENV_MISSING in statuses:
        return 2
    return 0


def format_memory(num_bytes):
    return "-" if num_bytes is None else f"{num_bytes / 2 ** 20:.0f} MiB"


def format_table(results, builds=None):
    """The one table: case, result, s/step, peak GPU memory, hybrid-engine check, wall seconds, note;
    then the counts and the op builds that ran before the cases."""
    header = ("case", "result", "s/step", "peak GPU mem", "hybrid engine", "wall s", "note")
    rows = [header]
    for r in results:
        rows.append((r.case, r.status,
                     "-" if r.seconds_per_step is None else f"{r.seconds_per_step:.3f}",
                     format_memory(r.peak_memory_bytes), r.hybrid,
                     "-" if r.wall_s is None else f"{r.wall_s:.0f}", r.note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)] + [str(row[-1])]
        lines.append(" | ".join(cells).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 4)
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, ENV_MISSING, SKIP)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    if builds:
        lines.append("op builds, before the cases (not charged to --budget-s): " + "; ".join(
            format_build(b)[len("[build] "):] for b in builds.values()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ running

def child_env(extra):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_inputs(paths):
    """The tiny OPT and Llama checkpoints and the synthetic data; {input: error} of what failed."""
    from utils.data.synthetic import build_dataset
    from utils.model.tiny_models import build_tiny_checkpoint

    errors = {}
    for family, key in (("opt", "tiny_opt"), ("llama", "tiny_llama")):
        try:
            build_tiny_checkpoint(family, paths[key], **MODEL_SHAPE)
        except Exception as err:  # noqa: BLE001 - reported in the rows that need it
            errors[family] = f"building the tiny {family} failed: {type(err).__name__}: {err}"
    try:
        if not os.path.isdir(paths["data"]):
            build_dataset(paths["data_root"], **DATA_ROWS)
    except Exception as err:  # noqa: BLE001
        errors["data"] = f"building the data failed: {type(err).__name__}: {err}"
    return errors


def run_logged(command, log_path, env, timeout_s):
    """Run `command` in its own process group, output to `log_path`; on a timeout kill the group
    (the launcher and every rank). (returncode, log text, seconds, timed_out)."""
    start = time.time()
    timed_out = False
    with open(log_path, "w") as log_file:
        log_file.write("$ " + shlex.join(command) + "\n")
        log_file.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            returncode = proc.wait()
    seconds = time.time() - start
    with open(log_path, errors="replace") as f:
        log = f.read()
    return returncode, log, seconds, timed_out


def peak_memory_of(stats_path):
    """The largest `max_memory_allocated` peak_memory.py wrote for the case: `stats_path` (rank 0,
    or a single process) and `stats_path.rank<N>` (the other ranks); None when none was written."""
    peaks = []
    for path in [stats_path] + sorted(glob.glob(stats_path + ".rank*")):
        try:
            with open(path) as f:
                value = json.load(f).get("max_memory_allocated")
        except (OSError, ValueError):
            continue
        if value is not None:
            peaks.append(value)
    return max(peaks) if peaks else None


def run_case(case, command, paths, env_extra, timeout_s):
    """(returncode, log, wall seconds, peak memory bytes, timed_out) of one case."""
    log_path = os.path.join(paths["run"], "logs", f"{case.name}.log")
    stats_path = os.path.join(paths["run"], "stats", f"{case.name}.json")
    for directory in (os.path.dirname(log_path), os.path.dirname(stats_path), paths["out"][case.name]):
        os.makedirs(directory, exist_ok=True)
    env = child_env(dict(env_extra, SMOKE_STATS_FILE=stats_path))
    returncode, log, wall, timed_out = run_logged(command, log_path, env, timeout_s)
    return returncode, log, wall, peak_memory_of(stats_path), timed_out


def plan(selected, paths):
    """[(case, command or None, skip reason or None)] in run order."""
    return [(case, case_command(case, paths, free_port()), None)
            for case in CASES if case.name in selected]


def case_env_extra(env):
    """What the cases and the op builds run with on top of this environment: the CUDA accelerator,
    this GPU's architecture (the builds' flags, so the cases find the cached builds) and MAX_JOBS."""
    extra = {"DS_ACCELERATOR": "cuda"}
    if env.get("capability"):
        extra["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", env["capability"])
    extra["MAX_JOBS"] = os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))
    return extra


def budget_clock_start(start, builds):
    """When the cases' --budget-s clock started: the op builds' time is not charged to it."""
    return start + sum(b.seconds or 0 for b in (builds or {}).values())


def print_dry_run(planned, paths, build_timeout_s=DEFAULT_BUILD_TIMEOUT_S):
    print(f"# gpu_smoke dry run: {len(planned)} cases, nothing is built or run")
    print(f"# environment check: {shlex.join([sys.executable, 'scripts/gpu_smoke.py', '--env-json'])}")
    ops = [op for op in OP_BUILDERS if any(op in case.ops for case, _, skip in planned if not skip)]
    print(f"# op builds, once, before the cases (not charged to --budget-s; each its own "
          f"{build_timeout_s:.0f}s timeout; skipped for ops the install ships prebuilt): "
          + "; ".join(shlex.join(build_command(op)) for op in ops)
          + " (+ transformer_inference for a hybrid-engine case whose model the check passes)")
    print(f"# inputs: tiny OPT {paths['tiny_opt']}, tiny Llama {paths['tiny_llama']}, "
          f"data {paths['data']} (utils/model/tiny_models.py, utils/data/synthetic.py)")
    print(f"# child environment: DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST=<this GPU> "
          f"SMOKE_STATS_FILE={paths['run']}/stats/<case>.json; cwd {ROOT}")
    for case, command, skip in planned:
        gpus = f" [{case.gpus} GPUs; skipped on a node with fewer]" if case.gpus > 1 else ""
        print(f"[{case.name}] {case.covers}{gpus}")
        print(f"  skip: {skip}" if skip else f"  {shlex.join(command)}")


def print_environment(env):
    keys = ("gpu", "gpu_count", "capability", "torch", "torch_cuda", "nvcc", "nvcc_release", "ninja",
            "cxx", "deepspeed", "prebuilt_ops", "missing_modules", "cuda_mismatch", "cuda_note")
    print("environment: " + "; ".join(f"{k}={env[k]}" for k in keys if env.get(k) not in (None, [], "")))
    for family, (compatible, reason) in env.get("hybrid_check", {}).items():
        print(f"hybrid-engine check, {family}: {'compatible' if compatible else 'incompatible'}: {reason}")


def run_all(planned, paths, env, budget_s, start, builds=None):
    """Run the planned cases in order (or say why not); [Result] in the same order. `builds`: the
    op builds that ran before (a case whose op did not build is not started)."""
    results = {}
    env_extra = case_env_extra(env)
    input_errors = None
    for case, command, skip in planned:
        if skip:
            results[case.name] = Result(case.name, SKIP, note=skip)
            continue
        reason = env_missing_reason(case, env)
        if reason:
            results[case.name] = Result(case.name, ENV_MISSING, note=reason)
            continue
        shortage = gpu_shortage(case, env)
        if shortage:
            results[case.name] = Result(case.name, SKIP, note=shortage)
            continue
        not_built = build_problem(case, env, builds or {})
        if not_built:
            results[case.name] = Result(case.name, not_built[0], note=not_built[1])
            continue
        blocked = [d for d in case.after if d in results and results[d].status != PASS]
        if blocked:
            status = ENV_MISSING if results[blocked[0]].status == ENV_MISSING else SKIP
            results[case.name] = Result(case.name, status, note=f"needs {blocked[0]} "
                                        f"({results[blocked[0]].status})")
            continue
        if input_errors is None:
            input_errors = build_inputs(paths)
        input_error = input_errors.get(case.family) or input_errors.get("data")
        if input_error:
            missing_package = "ModuleNotFoundError" in input_error or "ImportError" in input_error
            results[case.name] = Result(case.name, ENV_MISSING if missing_package else FAIL,
                                        note=input_error)
            continue
        remaining = budget_s - (time.time() - start)
        if remaining <= 0:
            results[case.name] = Result(case.name, SKIP,
                                        note=f"time budget spent; rerun with --only {case.name}")
            continue
        timeout = min(case.timeout_s, max(remaining, 30))
        print(f"[{case.name}] running (timeout {timeout:.0f}s) ...", flush=True)
        returncode, log, wall, peak, timed_out = run_case(case, command, paths, env_extra, timeout)
        budget_stop = timed_out and timeout < case.timeout_s
        out_dir = paths["out"][case.name]
        status, hybrid, note = judge(case, returncode, log, env.get("hybrid_check", {}).get(case.family),
                                     out_dir, timed_out, budget_stop)
        records = metrics_verdict(case, out_dir)[2] if returncode == 0 else None
        results[case.name] = Result(case.name, status, seconds_per_step(log, records), peak, hybrid,
                                    wall, note)
        print(f"[{case.name}] {status} in {wall:.0f}s", flush=True)
    return [results[case.name] for case, _, _ in planned]


def write_summary(path, env, builds, results, seconds):
    with open(path, "w") as f:
        json.dump({"environment": env, "builds": [asdict(b) for b in builds.values()],
                   "results": [asdict(r) for r in results], "seconds": round(seconds, 1)}, f, indent=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
    parser.add_argument("--workdir", default=None,
                        help="Where models, data and runs go (default: a new temporary directory).")
    parser.add_argument("--only", default=None,
                        help="Comma-separated case names (the cases they read from run too).")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="No case starts after this many seconds (the op builds not counted); "
                             "a case still running at it is stopped.")
    parser.add_argument("--build-timeout-s", type=float, default=DEFAULT_BUILD_TIMEOUT_S,
                        help="Timeout of each op build before the cases.")
    parser.add_argument("--build-only", action="store_true",
                        help="Only build the ops the selected cases need (a cold node's JIT cache), "
                             "then stop: exit 0 when every one is built, 2 otherwise.")
    parser.add_argument("--strict", action="store_true", help="Exit 2 when a case is env-missing.")
    parser.add_argument("--env-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-op", choices=sorted(OP_BUILDERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in CASE_NAMES]
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; the cases: {', '.join(CASE_NAMES)}")
    return args


def selected_cases(only):
    """The names to run: all, or `only` and (transitively) the cases they read from."""
    if not only:
        return set(CASE_NAMES)
    by_name = {case.name: case for case in CASES}
    chosen, todo = set(), list(only.split(","))
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo.extend(by_name[name].after)
    return chosen


def main(argv=None):
    args = parse_args(argv)
    if args.env_json:
        print(json.dumps(probe_environment()))
        return 0
    if args.build_op:
        return build_op(args.build_op)
    start = time.time()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="gpu-smoke-"))
    run_dir = os.path.join(workdir, "runs", time.strftime("%Y%m%d-%H%M%S"))  # fresh dirs every run
    paths = run_paths(workdir, run_dir)
    planned = plan(selected_cases(args.only), paths)
    if args.dry_run:
        print_dry_run(planned, paths, args.build_timeout_s)
        return 0
    os.makedirs(run_dir, exist_ok=True)
    env = environment_report()
    print_environment(env)
    builds = build_ops(ops_to_build(planned, env), paths, case_env_extra(env), args.build_timeout_s)
    if args.build_only:
        if not builds:
            print("[build] nothing to build: the selected cases' ops are prebuilt, or the cases "
                  "cannot run here (see the environment line)")
        return 0 if all(b.status in (BUILT, CACHED) for b in builds.values()) else 2
    results = run_all(planned, paths, env, args.budget_s, budget_clock_start(start, builds), builds)
    print()
    print(format_table(results, builds))
    failed = [r for r in results if r.status == FAIL]
    for r in failed:
        log_path = os.path.join(run_dir, "logs", r.case + ".log")
        if os.path.exists(log_path):
            print(f"\n--- {r.case}: {log_path} (last lines)")
            with open(log_path, errors="replace") as f:
                print("".join(f.readlines()[-15:]).rstrip())
    seconds = time.time() - start
    write_summary(os.path.join(run_dir, "summary.json"), env, builds, results, seconds)
    print(f"\nlogs and outputs: {run_dir} ({seconds:.0f}s in all, "
          f"{sum(b.seconds or 0 for b in builds.values()):.0f}s of them op builds)")
    return exit_code(results, args.strict)


if __name__ == "__main__":
    sys.exit(main())
