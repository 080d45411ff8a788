"""GPU smoke run: every stage on tiny OPT- and Llama-shaped models, a few steps each, one table.

    bash scripts/gpu_smoke.sh                 # about 5 minutes on one GPU (less with a warm JIT cache)
    bash scripts/gpu_smoke.sh --dry-run       # print the commands, run nothing (no GPU needed)
    bash scripts/gpu_smoke.sh --only s3-opt-remax-he-on,he-probe-opt --workdir /tmp/smoke

The models (random weights, the project's tiny tokenizers) and the synthetic preference data are built
here from a config: nothing is downloaded. Each case runs through the deepspeed launcher on one GPU
into its own fresh output directory, and the table gives per case: pass / fail / env-missing / skip,
seconds per training step (the median of the step latencies the stage logs), peak GPU memory (PyTorch's
allocator in the case's process, via scripts/peak_memory.py) and the hybrid-engine check's verdict.
Exit status 1 when any case failed; env-missing (no CUDA, no nvcc/ninja/compiler, a Python package
missing) is not a failure unless --strict. docs/gpu.md says how to read the table.
"""
import argparse
import json
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
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STAGE3 = "step3_rlhf_finetuning/main.py"
PEAK_MEMORY = "scripts/peak_memory.py"
PROBE = "scripts/hybrid_engine_probe.py"
PASS, FAIL, ENV_MISSING, SKIP = "pass", "fail", "env-missing", "skip"
DEFAULT_BUDGET_S = 290  # the whole run stays under 5 minutes: no case starts after this

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
                    "algorithms", "rl_math", "rounds", "remax_math")

# Every training case but the offloaded one steps FusedAdam; ZeRO-Offload steps DeepSpeedCPUAdam.
SFT_ARGS = ("--data_path", "{data}", "--data_split", "2,4,4", "--data_output_path", "{cache}",
            "--output_dir", "{out}", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--weight_decay", "0.",
            "--num_train_epochs", "1", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0",
            "--gradient_checkpointing", "--evals_per_epoch", "1", "--print_loss", "--deepspeed")
REWARD_ARGS = SFT_ARGS[:SFT_ARGS.index("--learning_rate")] + (
    "--learning_rate", "1e-4", "--weight_decay", "0.1", "--num_train_epochs", "1",
    "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0", "--gradient_checkpointing",
    "--evals_per_epoch", "1", "--print_loss", "--deepspeed")
# The stage-3 recipes' flags (step3_rlhf_finetuning/training_scripts/*), at smoke sizes.
REMAX_ARGS = ("--data_path", "{data}", "--data_split", "2,4,4", "--data_output_path", "{cache}",
              "--output_dir", "{out}", "--per_device_generation_batch_size", "4",
              "--per_device_training_batch_size", "4", "--per_device_eval_batch_size", "4",
              "--generation_batches", "1", "--ppo_epochs", "1", "--max_prompt_seq_len", "32",
              "--max_answer_seq_len", "16", "--actor_learning_rate", "1e-6",
              "--actor_weight_decay", "0.1", "--num_train_epochs", "1", "--lr_scheduler_type",
              "cosine", "--gradient_accumulation_steps", "1", "--num_warmup_steps", "0",
              "--kl_ctl", "0.05", "--gamma", "0.99", "--actor_gradient_checkpointing",
              "--disable_actor_dropout", "--disable_reward_dropout", "--actor_zero_stage", "2",
              "--reward_zero_stage", "3", "--reference_zero_stage", "3", "--seed", "2023",
              "--print_answers", "--save_answers", "--eval_batches", "2", "--ppl_eval_batches", "2",
              "--evals_per_epoch", "1", "--enable_test_mode", "--test_stop_step", "2", "--deepspeed")
OPT_REMAX_ARGS = ("--actor_model_name_or_path", "{outs[s1-opt-fp16-z2]}",
                  "--reward_model_name_or_path", "{outs[s2-opt-fp16-z2]}",
                  "--num_padding_at_beginning", "1") + REMAX_ARGS
LLAMA_REMAX_ARGS = ("--actor_model_name_or_path", "{outs[s1-llama-bf16-z3]}",
                    "--reward_model_name_or_path", "{outs[s2-llama-bf16-z3]}",
                    "--num_padding_at_beginning", "0") + REMAX_ARGS + (
    "--offload", "--offload_reference_model", "--offload_reward_model", "--actor_bf16",
    "--reward_bf16", "--enable_hybrid_engine", "--save_at_final")
# PPO's extra flags, passed only when stage 3's --help lists them: the critic starts from the reward model.
PPO_OPTIONAL_ARGS = {"--critic_model_name_or_path": "{outs[s2-opt-fp16-z2]}", "--critic_zero_stage": "2"}


@dataclass(frozen=True)
class Case:
    name: str
    covers: str
    script: str
    args: tuple
    family: str = "opt"
    launcher: bool = True
    ops: tuple = ()      # DeepSpeed ops it builds: fused_adam, cpu_adam, transformer_inference
    after: tuple = ()    # cases whose outputs it reads
    hybrid: str = "-"    # "on": --enable_hybrid_engine; "off"; "forced": the probe; "-": n/a
    expect: tuple = ()   # log text that shows the case exercised what it covers
    algo: str = None     # an --algo that stage 3's --help must list, else the case is skipped
    timeout_s: int = 150


CASES = (
    Case("s1-opt-fp16-z2", "stage 1 OPT, fp16, ZeRO 2, FusedAdam", "step1_supervised_finetuning/main.py",
         ("--model_name_or_path", "{tiny_opt}", "--zero_stage", "2") + SFT_ARGS,
         ops=("fused_adam",), expect=("[optimizer] FusedAdam", "[precision] training in fp16")),
    Case("s1-llama-bf16-z3", "stage 1 Llama, bf16, ZeRO 3", "step1_supervised_finetuning/main.py",
         ("--model_name_or_path", "{tiny_llama}", "--zero_stage", "3", "--bf16") + SFT_ARGS,
         family="llama", ops=("fused_adam",),
         expect=("[optimizer] FusedAdam", "[precision] training in bf16")),
    Case("s2-opt-fp16-z2", "stage 2 OPT reward model, fp16, ZeRO 2",
         "step2_reward_model_finetuning/main.py",
         ("--model_name_or_path", "{outs[s1-opt-fp16-z2]}", "--num_padding_at_beginning", "1",
          "--zero_stage", "2") + REWARD_ARGS,
         ops=("fused_adam",), after=("s1-opt-fp16-z2",),
         expect=("[optimizer] FusedAdam", "[precision] training in fp16")),
    Case("s2-llama-bf16-z3", "stage 2 Llama reward model, bf16, ZeRO 3 (the Llama stage 3's reward)",
         "step2_reward_model_finetuning/main.py",
         ("--model_name_or_path", "{outs[s1-llama-bf16-z3]}", "--num_padding_at_beginning", "0",
          "--zero_stage", "3", "--bf16") + REWARD_ARGS,
         family="llama", ops=("fused_adam",), after=("s1-llama-bf16-z3",),
         expect=("[precision] training in bf16",)),
    Case("s3-opt-remax-he-on", "stage 3 ReMax, the OPT recipe: actor ZeRO 2 fp16, hybrid engine on",
         STAGE3, OPT_REMAX_ARGS + ("--enable_hybrid_engine",), ops=("fused_adam",),
         after=("s1-opt-fp16-z2", "s2-opt-fp16-z2"), hybrid="on",
         expect=("End-to-End => Latency", "[precision] training in fp16"), timeout_s=200),
    Case("s3-opt-remax-he-off", "stage 3 ReMax, the OPT recipe with the hybrid engine off", STAGE3,
         OPT_REMAX_ARGS, ops=("fused_adam",), after=("s1-opt-fp16-z2", "s2-opt-fp16-z2"),
         hybrid="off", expect=("End-to-End => Latency", "[precision] training in fp16"),
         timeout_s=200),
    Case("s3-llama-remax-bf16-offload",
         "stage 3 ReMax, the Llama-2 recipe: bf16, offload, reference and reward ZeRO 3 offloaded",
         STAGE3, LLAMA_REMAX_ARGS, family="llama", ops=("cpu_adam",),
         after=("s1-llama-bf16-z3", "s2-llama-bf16-z3"), hybrid="on",
         expect=("End-to-End => Latency", "[optimizer] DeepSpeedCPUAdam",
                 "[precision] training in bf16"), timeout_s=200),
    Case("s3-opt-ppo", "stage 3 --algo ppo, the OPT recipe", STAGE3,
         OPT_REMAX_ARGS + ("--enable_hybrid_engine", "--algo", "ppo"), ops=("fused_adam",),
         after=("s1-opt-fp16-z2", "s2-opt-fp16-z2"), hybrid="on", algo="ppo", timeout_s=200),
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
    Case("he-probe-opt", "hybrid engine forced on the tiny OPT (fp16): greedy vs the HF path", PROBE,
         ("--model", "{tiny_opt}", "--precision", "fp16"), ops=("transformer_inference",),
         hybrid="forced", expect=("HYBRID_ENGINE_PROBE",), timeout_s=240),
    Case("he-probe-llama", "hybrid engine forced on the tiny Llama (bf16): greedy vs the HF path",
         PROBE, ("--model", "{tiny_llama}", "--precision", "bf16"), family="llama",
         ops=("transformer_inference",), hybrid="forced", expect=("HYBRID_ENGINE_PROBE",),
         timeout_s=240),
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


def case_command(case, paths, port, extra_args=()):
    """argv of `case`: under the deepspeed launcher (one GPU) or plain python, via peak_memory.py.

    Argument templates name {out} / {cache} (the case's own), {outs[<case>]} (another case's
    output), {data}, {tiny_opt} and {tiny_llama}."""
    fields = {"out": paths["out"][case.name], "cache": os.path.join(paths["run"], "cache", case.name),
              "outs": paths["out"], "data": paths["data"], "tiny_opt": paths["tiny_opt"],
              "tiny_llama": paths["tiny_llama"]}
    args = [a.format(**fields) for a in case.args + tuple(extra_args)]
    if case.launcher:
        prefix = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                  "--master_port", str(port)]
    else:
        prefix = [sys.executable]
    return prefix + [PEAK_MEMORY, case.script] + args


def stage3_help():
    """(returncode, text) of `python step3_rlhf_finetuning/main.py --help`."""
    proc = subprocess.run([sys.executable, STAGE3, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180, env=child_env({}))
    return proc.returncode, proc.stdout


def algo_choices(help_text):
    """The --algo choices a --help text lists ([] when there is no such option)."""
    match = re.search(r"--algo\s+\{([^}]*)\}", help_text)
    return [c.strip() for c in match.group(1).split(",")] if match else []


def algo_extra_args(case, help_text):
    """The optional flags of `case`'s algorithm that this stage 3 accepts."""
    if case.algo != "ppo":
        return ()
    extra = ()
    for flag, value in PPO_OPTIONAL_ARGS.items():
        if re.search(rf"{re.escape(flag)}\b", help_text):
            extra += (flag, value)
    return extra


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
    cuda_ops = to_build - {"cpu_adam"}
    if cuda_ops and not env.get("nvcc"):
        lacks.append("nvcc (a CUDA toolkit; CUDA_HOME)")
    if lacks:
        return f"cannot build {', '.join(sorted(to_build))}: no {', no '.join(lacks)}"
    if cuda_ops and env.get("cuda_mismatch"):
        return f"cannot build {', '.join(sorted(cuda_ops))}: {env['cuda_mismatch']}"
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


def seconds_per_step(log):
    """Median step latency the stage logged (the first step, with its warm-up, left out), or None."""
    values = [float(v) for v in STEP_LATENCY.findall(log)]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


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
    if case.hybrid in ("-", "off"):
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


def judge(case, returncode, log, static, timed_out=False, budget_stop=False):
    """Result fields (status, hybrid column, note) of a finished case."""
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
    missing = [text for text in case.expect if text not in log]
    if missing:
        return FAIL, hybrid, f"log lacks {missing[0]!r}"
    if problem:
        return FAIL, hybrid, problem
    return PASS, hybrid, ""


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


def format_table(results):
    """The one table: case, result, s/step, peak GPU memory, hybrid-engine check, wall seconds, note."""
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


def run_case(case, command, paths, env_extra, timeout_s):
    """(returncode, log, wall seconds, peak memory bytes, timed_out) of one case."""
    log_path = os.path.join(paths["run"], "logs", f"{case.name}.log")
    stats_path = os.path.join(paths["run"], "stats", f"{case.name}.json")
    for directory in (os.path.dirname(log_path), os.path.dirname(stats_path), paths["out"][case.name]):
        os.makedirs(directory, exist_ok=True)
    env = child_env(dict(env_extra, SMOKE_STATS_FILE=stats_path))
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
    wall = time.time() - start
    with open(log_path, errors="replace") as f:
        log = f.read()
    peak = None
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            peak = json.load(f).get("max_memory_allocated")
    return returncode, log, wall, peak, timed_out


def plan(selected, help_info, paths):
    """[(case, command or None, skip reason or None)] in run order."""
    help_rc, help_text = help_info
    choices = algo_choices(help_text) if help_rc == 0 else []
    planned = []
    for case in CASES:
        if case.name not in selected:
            continue
        if case.algo and case.algo not in choices:
            why = (f"stage 3 --help lists --algo choices {{{','.join(choices)}}}; {case.algo} not "
                   "among them yet") if help_rc == 0 else f"stage 3 --help failed (exit {help_rc})"
            planned.append((case, None, why))
            continue
        command = case_command(case, paths, free_port(), algo_extra_args(case, help_text))
        planned.append((case, command, None))
    return planned


def print_dry_run(planned, paths):
    print(f"# gpu_smoke dry run: {len(planned)} cases, nothing is built or run")
    print(f"# environment check: {shlex.join([sys.executable, 'scripts/gpu_smoke.py', '--env-json'])}")
    print(f"# inputs: tiny OPT {paths['tiny_opt']}, tiny Llama {paths['tiny_llama']}, "
          f"data {paths['data']} (utils/model/tiny_models.py, utils/data/synthetic.py)")
    print(f"# child environment: DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST=<this GPU> "
          f"SMOKE_STATS_FILE={paths['run']}/stats/<case>.json; cwd {ROOT}")
    for case, command, skip in planned:
        print(f"[{case.name}] {case.covers}")
        print(f"  skip: {skip}" if skip else f"  {shlex.join(command)}")


def print_environment(env):
    keys = ("gpu", "capability", "torch", "torch_cuda", "nvcc", "nvcc_release", "ninja", "cxx",
            "deepspeed", "prebuilt_ops", "missing_modules", "cuda_mismatch", "cuda_note")
    print("environment: " + "; ".join(f"{k}={env[k]}" for k in keys if env.get(k) not in (None, [], "")))
    for family, (compatible, reason) in env.get("hybrid_check", {}).items():
        print(f"hybrid-engine check, {family}: {'compatible' if compatible else 'incompatible'}: {reason}")


def run_all(planned, paths, env, budget_s, start):
    """Run the planned cases in order (or say why not); [Result] in the same order."""
    results = {}
    env_extra = {"DS_ACCELERATOR": "cuda"}
    if env.get("capability"):
        env_extra["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", env["capability"])
    env_extra["MAX_JOBS"] = os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))
    input_errors = None
    for case, command, skip in planned:
        if skip:
            results[case.name] = Result(case.name, SKIP, note=skip)
            continue
        reason = env_missing_reason(case, env)
        if reason:
            results[case.name] = Result(case.name, ENV_MISSING, note=reason)
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
        status, hybrid, note = judge(case, returncode, log, env.get("hybrid_check", {}).get(case.family),
                                     timed_out, budget_stop)
        results[case.name] = Result(case.name, status, seconds_per_step(log), peak, hybrid, wall, note)
        print(f"[{case.name}] {status} in {wall:.0f}s", flush=True)
    return [results[case.name] for case, _, _ in planned]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
    parser.add_argument("--workdir", default=None,
                        help="Where models, data and runs go (default: a new temporary directory).")
    parser.add_argument("--only", default=None,
                        help="Comma-separated case names (the cases they read from run too).")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="No case starts after this many seconds; a case still running at it is stopped.")
    parser.add_argument("--strict", action="store_true", help="Exit 2 when a case is env-missing.")
    parser.add_argument("--env-json", action="store_true", help=argparse.SUPPRESS)
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
    start = time.time()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="gpu-smoke-"))
    run_dir = os.path.join(workdir, "runs", time.strftime("%Y%m%d-%H%M%S"))  # fresh dirs every run
    paths = run_paths(workdir, run_dir)
    selected = selected_cases(args.only)
    needs_help = any(case.algo for case in CASES if case.name in selected)
    planned = plan(selected, stage3_help() if needs_help else (0, ""), paths)
    if args.dry_run:
        print_dry_run(planned, paths)
        return 0
    os.makedirs(run_dir, exist_ok=True)
    env = environment_report()
    print_environment(env)
    results = run_all(planned, paths, env, args.budget_s, start)
    print()
    print(format_table(results))
    failed = [r for r in results if r.status == FAIL]
    for r in failed:
        log_path = os.path.join(run_dir, "logs", r.case + ".log")
        if os.path.exists(log_path):
            print(f"\n--- {r.case}: {log_path} (last lines)")
            with open(log_path, errors="replace") as f:
                print("".join(f.readlines()[-15:]).rstrip())
    print(f"\nlogs and outputs: {run_dir} ({time.time() - start:.0f}s in all)")
    return exit_code(results, args.strict)


if __name__ == "__main__":
    sys.exit(main())
