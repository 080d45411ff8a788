"""scripts/gpu_smoke.sh without a GPU: the dry run prints a command for every case (each accepted by
its script's own argument parser), the --algo ppo row follows stage 3's --help, and the table,
verdict and environment logic on made-up logs and environments. The real run is for a GPU node."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_smoke  # noqa: E402
import hybrid_engine_probe  # noqa: E402
from gpu_smoke import (CASES, ENV_MISSING, FAIL, PASS, SKIP, Result, algo_choices,  # noqa: E402
                       algo_extra_args, env_missing_reason, exit_code, format_table, judge,
                       seconds_per_step, selected_cases)

BY_NAME = {case.name: case for case in CASES}


def run_smoke(args, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), *args, "--workdir",
                           str(tmp_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    return proc


def parse_dry_run(stdout):
    """{case: argv list, or the skip reason (a str)} from the dry run's output."""
    planned, name = {}, None
    for line in stdout.splitlines():
        header = re.match(r"\[([\w-]+)\] ", line)
        if header:
            name = header.group(1)
        elif name and line.startswith("  "):
            body = line.strip()
            planned[name] = body[len("skip: "):] if body.startswith("skip: ") else shlex.split(body)
    return planned


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    proc = run_smoke(["--dry-run"], tmp_path_factory.mktemp("smoke"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return parse_dry_run(proc.stdout)


@pytest.fixture(scope="module")
def stage3_lists_ppo():
    """Decided here from --help on its own, not by the smoke script's parser."""
    proc = subprocess.run([sys.executable, str(ROOT / "step3_rlhf_finetuning" / "main.py"), "--help"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage = proc.stdout.split("--algo", 1)[1].split("}", 1)[0]
    return "ppo" in usage


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


REQUIRED = {
    "s1-opt-fp16-z2": (["--zero_stage", "2"], ["--bf16", "--offload"]),
    "s1-llama-bf16-z3": (["--zero_stage", "3", "--bf16"], ["--offload"]),
    "s2-opt-fp16-z2": (["--zero_stage", "2"], ["--bf16"]),
    "s2-llama-bf16-z3": (["--zero_stage", "3", "--bf16"], []),
    "s3-opt-remax-he-on": (["--enable_hybrid_engine", "--actor_zero_stage", "2",
                            "--reference_zero_stage", "3", "--reward_zero_stage", "3",
                            "--enable_test_mode", "--test_stop_step"],
                           ["--actor_bf16", "--offload", "--algo"]),
    "s3-opt-remax-he-off": (["--actor_zero_stage", "2"], ["--enable_hybrid_engine", "--actor_bf16"]),
    "s3-llama-remax-bf16-offload": (["--offload", "--offload_reference_model",
                                     "--offload_reward_model", "--actor_bf16", "--reward_bf16",
                                     "--reference_zero_stage", "--reward_zero_stage",
                                     "--enable_hybrid_engine", "--enable_test_mode"], []),
    "s3-opt-ppo": (["--algo", "ppo", "--enable_hybrid_engine", "--critic_model_name_or_path"], []),
    "rw-eval-opt": (["--dtype", "fp16"], []),
    "prompt-eval-opt": (["--dtype", "fp16"], []),
    "he-probe-opt": (["--precision", "fp16"], []),
    "he-probe-llama": (["--precision", "bf16"], []),
}


def test_dry_run_prints_every_case(dry_run, stage3_lists_ppo):
    assert set(dry_run) == set(BY_NAME) == set(REQUIRED)
    for name, argv in dry_run.items():
        if name == "s3-opt-ppo" and not stage3_lists_ppo:
            assert isinstance(argv, str) and "ppo" in argv  # skipped, with the reason
            continue
        assert isinstance(argv, list), f"{name} was skipped: {argv}"
        case = BY_NAME[name]
        script_at = argv.index("scripts/peak_memory.py") + 1
        assert argv[script_at] == case.script and (ROOT / case.script).exists()
        if case.launcher:
            assert argv[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port"]
        required, forbidden = REQUIRED[name]
        for token in required:
            assert token in argv, (name, token)
        for token in forbidden:
            assert token not in argv, (name, token)
    # A hybrid engine case for each recipe, in the precision the recipe uses.
    assert flag_value(dry_run["s3-llama-remax-bf16-offload"], "--reference_zero_stage") == "3"


def test_dry_run_ppo_row_follows_help(dry_run, stage3_lists_ppo):
    assert isinstance(dry_run["s3-opt-ppo"], list) is stage3_lists_ppo


def test_each_case_has_a_fresh_output_dir(dry_run):
    outputs = [flag_value(argv, "--output_dir") for argv in dry_run.values()
               if isinstance(argv, list) and "--output_dir" in argv]
    assert len(outputs) == len(set(outputs)) >= 7
    assert all(not os.path.exists(path) for path in outputs)
    # Stage 3 reads the stage-1 and stage-2 outputs of the same run.
    he_on = dry_run["s3-opt-remax-he-on"]
    assert flag_value(he_on, "--actor_model_name_or_path") == flag_value(dry_run["s1-opt-fp16-z2"], "--output_dir")
    assert flag_value(he_on, "--reward_model_name_or_path") == flag_value(dry_run["s2-opt-fp16-z2"], "--output_dir")


def load_script(relative):
    spec = importlib.util.spec_from_file_location("_smoke_" + relative.replace("/", "_")[:-3],
                                                  ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_parses_with_its_scripts_own_parser(dry_run, monkeypatch):
    """No flag the stages would reject (a typo would only show on the GPU node otherwise)."""
    monkeypatch.syspath_prepend(str(ROOT / "step3_rlhf_finetuning"))
    parsers = {}
    for name, argv in dry_run.items():
        if not isinstance(argv, list):
            continue
        script_at = argv.index("scripts/peak_memory.py") + 1
        script = argv[script_at]
        if script not in parsers:
            parsers[script] = load_script(script).parse_args
        args = argv[script_at + 1:]
        parsed = parsers[script](["--local_rank=0", *args] if BY_NAME[name].launcher else args)
        assert parsed is not None


# ------------------------------------------------------------------------- verdict logic

STEP3_LOG = "\n".join(f"End-to-End => Latency: {s:.2f}s, TFLOPs: 1.00 | Generation: 0.1s"
                      for s in (3.0, 0.5, 0.7)) + "\n[precision] training in fp16 (dynamic loss scaling)"


def test_seconds_per_step_is_the_median_without_the_first_step():
    assert seconds_per_step(STEP3_LOG) == pytest.approx(0.6)
    assert seconds_per_step("Model Parameters: 0.001 B, Latency: 0.25s, TFLOPs: 0.01") == 0.25
    assert seconds_per_step("no steps here") is None


@pytest.mark.parametrize("returncode, log, status, note", [
    (0, STEP3_LOG, PASS, ""),
    (0, "[precision] training in fp16", FAIL, "End-to-End"),
    (1, "RuntimeError: Error building extension 'fused_adam'", ENV_MISSING, "Error building extension"),
    (1, "ModuleNotFoundError: No module named 'hjson'", ENV_MISSING, "hjson"),
    (1, "ModuleNotFoundError: No module named 'utils.missing'", FAIL, "exit status 1"),
    (1, "Traceback ... ValueError: bad", FAIL, "exit status 1"),
])
def test_judge_status(returncode, log, status, note):
    got_status, _, got_note = judge(BY_NAME["s3-opt-remax-he-off"], returncode, log, [False, "why"])
    assert got_status == status and note in got_note


def test_judge_timeouts():
    case = BY_NAME["s1-opt-fp16-z2"]
    assert judge(case, -9, "", None, timed_out=True)[0] == FAIL
    assert judge(case, -9, "", None, timed_out=True, budget_stop=True)[0] == SKIP


HE_ON_CONFIG = "[INFO] hybrid_engine ................ enabled=True max_out_tokens=48"
FALLBACK = ("[hybrid-engine check] --enable_hybrid_engine is ignored for /x: DeepSpeed would replace "
            "OPTDecoderLayer ... Generation falls back to the Hugging Face path")


@pytest.mark.parametrize("log, status, verdict", [
    (STEP3_LOG + "\n" + FALLBACK, PASS, "fallback to HF generate"),
    (STEP3_LOG + "\n" + HE_ON_CONFIG, FAIL, "kernels on, check says incompatible"),
    (STEP3_LOG + "\n" + HE_ON_CONFIG + "\nNo compatible DeepSpeed inference policy found", PASS,
     "HF generate (DeepSpeed has no policy)"),
])
def test_hybrid_engine_column_of_a_recipe_case(log, status, verdict):
    got_status, got_verdict, note = judge(BY_NAME["s3-opt-remax-he-on"], 0, log, [False, "why"])
    assert got_status == status and got_verdict.startswith(verdict)
    if status == FAIL:
        assert "model_path" in note


def test_hybrid_engine_column_when_the_check_passes():
    _, verdict, _ = judge(BY_NAME["s3-opt-remax-he-on"], 0, STEP3_LOG + HE_ON_CONFIG, [True, "ok"])
    assert verdict == "kernels on (check: compatible)"


def probe_log(result):
    return "some output\n" + hybrid_engine_probe.PROBE_PREFIX + json.dumps(result)


def test_probe_verdicts():
    case = BY_NAME["he-probe-opt"]
    crash = {"static_compatible": False, "runtime_ok": False,
             "info": {"error": "generate_a raised AttributeError: 'tuple' object has no attribute 'shape'"}}
    status, verdict, _ = judge(case, 0, probe_log(crash), None)
    assert status == PASS
    assert verdict == "check: incompatible; kernels crash: AttributeError: 'tuple' object has no attribute 'shape'"
    diverge = {"static_compatible": True, "runtime_ok": False,
               "info": {"row": 0, "position": 3, "a": 1, "b": 2}}
    assert hybrid_engine_probe.probe_exit_code(diverge) == 1
    status, verdict, _ = judge(case, 1, probe_log(diverge), None)
    assert status == FAIL and verdict == "check: compatible; kernels diverge at token 3"
    assert judge(case, 3, probe_log(dict(crash, env_error="x")), None)[0] == ENV_MISSING
    assert hybrid_engine_probe.probe_exit_code(crash) == 0
    assert hybrid_engine_probe.probe_exit_code(dict(crash, env_error="ninja")) == 3
    # No runtime verdict (the engine did not build): a failure of the probe, not a confirmation.
    no_engine = dict(crash, probe_error="the hybrid engine did not build: ValueError: head size")
    assert hybrid_engine_probe.probe_exit_code(no_engine) == 2
    status, verdict, note = judge(case, 2, probe_log(no_engine), None)
    assert status == FAIL and verdict.endswith("no runtime verdict") and "head size" in note


@pytest.mark.parametrize("text, env", [
    ("RuntimeError: Error building extension 'transformer_inference'", True),
    ("ModuleNotFoundError: No module named 'mpi4py'", True),
    ("ModuleNotFoundError: No module named 'utils.gone'", False),
    ("AttributeError: 'tuple' object has no attribute 'shape'", False),
])
def test_probe_env_errors(text, env):
    assert hybrid_engine_probe.is_env_error(text) is env


def test_exit_code():
    assert exit_code([Result("a", PASS), Result("b", ENV_MISSING), Result("c", SKIP)]) == 0
    assert exit_code([Result("a", PASS), Result("b", FAIL)]) == 1
    assert exit_code([Result("a", PASS), Result("b", ENV_MISSING)], strict=True) == 2


def test_format_table():
    table = format_table([Result("s1-opt-fp16-z2", PASS, 0.0321, 3 * 2 ** 20, "-", 12.4),
                          Result("he-probe-opt", ENV_MISSING, note="no nvcc")]).splitlines()
    assert [c.strip() for c in table[0].split("|")] == ["case", "result", "s/step", "peak GPU mem",
                                                       "hybrid engine", "wall s", "note"]
    assert [c.strip() for c in table[2].split("|")] == ["s1-opt-fp16-z2", "pass", "0.032", "3 MiB",
                                                       "-", "12", ""]
    assert [c.strip() for c in table[3].split("|")][:2] == ["he-probe-opt", "env-missing"]
    assert table[-1] == "1 pass, 0 fail, 1 env-missing, 0 skip"


# ---------------------------------------------------------------------------- environment

GPU_ENV = {"missing_modules": [], "cuda": True, "capability": "9.0", "ninja": True,
           "cxx": "/usr/bin/c++", "nvcc": "/usr/local/cuda/bin/nvcc", "deepspeed": "0.19.8",
           "prebuilt_ops": [], "hybrid_check": {"opt": [False, "x"], "llama": [False, "x"]}}


@pytest.mark.parametrize("case, changes, reason", [
    ("s1-opt-fp16-z2", {}, None),
    ("s1-opt-fp16-z2", {"missing_modules": ["deepspeed", "cpuinfo"]}, "deepspeed py-cpuinfo"),
    ("s1-opt-fp16-z2", {"cuda": False, "cuda_note": "no CUDA device visible"}, "no CUDA device"),
    ("s1-opt-fp16-z2", {"nvcc": None}, "no nvcc"),
    ("s1-opt-fp16-z2", {"nvcc": None, "prebuilt_ops": ["fused_adam"]}, None),
    ("s1-opt-fp16-z2", {"ninja": False}, "no ninja"),
    ("s1-opt-fp16-z2", {"cuda_mismatch": "CUDAMismatchException: 12.1 vs 12.4"}, "12.1 vs 12.4"),
    ("s3-llama-remax-bf16-offload", {"nvcc": None}, None),  # CPU Adam needs a C++ compiler only
    ("s3-llama-remax-bf16-offload", {"cxx": None}, "no a C++ compiler"),
    ("s3-opt-remax-he-on", {"nvcc": None, "prebuilt_ops": ["fused_adam"]}, None),  # falls back
    ("s3-opt-remax-he-on", {"nvcc": None, "prebuilt_ops": ["fused_adam"],
                            "hybrid_check": {"opt": [True, "ok"]}}, "transformer_inference"),
    ("he-probe-opt", {"nvcc": None}, "transformer_inference"),
    ("rw-eval-opt", {"nvcc": None, "ninja": False}, None),
])
def test_env_missing_reason(case, changes, reason):
    got = env_missing_reason(BY_NAME[case], dict(GPU_ENV, **changes))
    if reason is None:
        assert got is None
    else:
        assert reason in got


def test_env_missing_rows_on_this_cpu_machine(tmp_path):
    """The real (not dry) run here: no CUDA, so env-missing rows and exit status 0."""
    proc = run_smoke(["--only", "he-probe-opt,rw-eval-opt"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("he-probe-opt", "rw-eval-opt", "s"))]
    statuses = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in rows if "|" in line}
    assert statuses == {"he-probe-opt": ENV_MISSING, "rw-eval-opt": ENV_MISSING,
                        "s1-opt-fp16-z2": ENV_MISSING, "s2-opt-fp16-z2": ENV_MISSING}
    assert "0 fail" in proc.stdout


def test_dependencies_and_selection(monkeypatch, tmp_path):
    assert selected_cases("s3-opt-remax-he-on") == {"s3-opt-remax-he-on", "s1-opt-fp16-z2",
                                                    "s2-opt-fp16-z2"}
    ran = []

    def fake_run(case, command, paths, env_extra, timeout_s):
        ran.append(case.name)
        return (1, "boom", 1.0, None, False) if case.name == "s1-opt-fp16-z2" else (0, "", 1.0, None, False)

    monkeypatch.setattr(gpu_smoke, "run_case", fake_run)
    monkeypatch.setattr(gpu_smoke, "build_inputs", lambda paths: {})
    paths = gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run"))
    planned = gpu_smoke.plan(selected_cases("rw-eval-opt"), (0, "--algo {remax}"), paths)
    results = {r.case: r for r in gpu_smoke.run_all(planned, paths, GPU_ENV, 100, start=0)}
    assert ran == []  # started at the epoch: the budget was spent before the first case
    assert all(r.status == SKIP for r in results.values())
    assert "time budget" in results["s1-opt-fp16-z2"].note
    results = {r.case: r for r in gpu_smoke.run_all(planned, paths, GPU_ENV, 100, start=time.time())}
    assert ran == ["s1-opt-fp16-z2"]
    assert results["s1-opt-fp16-z2"].status == FAIL
    assert results["s2-opt-fp16-z2"].status == SKIP and "needs s1-opt-fp16-z2" in results["s2-opt-fp16-z2"].note


def test_algo_choices_and_optional_flags():
    help_text = "usage: main.py [--algo {grpo,ppo,remax}]\n  --critic_zero_stage {0,1,2,3}\n"
    assert algo_choices(help_text) == ["grpo", "ppo", "remax"]
    assert algo_choices("usage: main.py [-h]") == []
    assert algo_extra_args(BY_NAME["s3-opt-ppo"], help_text) == ("--critic_zero_stage", "2")
    assert algo_extra_args(BY_NAME["s3-opt-remax-he-on"], help_text) == ()


# ----------------------------------------------------------------------------- peak_memory.py

def test_peak_memory_wrapper_hands_on_argv_and_writes_stats(tmp_path):
    target = tmp_path / "target.py"
    target.write_text("import json, sys, torch\n"
                      "json.dump({'argv': sys.argv, 'path0': sys.path[0]}, open(sys.argv[-1], 'w'))\n"
                      "sys.exit(3)\n")
    seen, stats = tmp_path / "seen.json", tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "peak_memory.py"), "--local_rank=0",
                           str(target), "--flag", str(seen)], env=dict(os.environ, SMOKE_STATS_FILE=str(stats)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the target's exit status
    assert json.loads(seen.read_text()) == {"argv": [str(target), "--local_rank=0", "--flag", str(seen)],
                                            "path0": str(tmp_path)}
    assert json.loads(stats.read_text())["max_memory_allocated"] is None  # no CUDA here
