"""scripts/gpu_smoke.sh without a GPU: the dry run prints a command for every case (each accepted by
its script's own argument parser, each carrying its recipe's flags), the op builds, and the verdict,
metrics, table and environment logic on made-up logs, metrics files and environments. The real run
is for a GPU node."""
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_smoke  # noqa: E402
import hybrid_engine_probe  # noqa: E402
import peak_memory  # noqa: E402
from gpu_smoke import (CASES, ENV_MISSING, FAIL, PASS, SKIP, Build, Result,  # noqa: E402
                       env_missing_reason, exit_code, format_table, judge, seconds_per_step,
                       selected_cases)

BY_NAME = {case.name: case for case in CASES}
PPO_2GPU = "s3-llama-ppo-fp16-z3-ema-2gpu"


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
def dry_run_output(tmp_path_factory):
    proc = run_smoke(["--dry-run"], tmp_path_factory.mktemp("smoke"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def dry_run(dry_run_output):
    return parse_dry_run(dry_run_output)


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


REQUIRED = {
    "s1-opt-fp16-z2": (["--zero_stage", "2"], ["--bf16", "--offload"]),
    "s1-llama-fp16-z2-offload": (["--zero_stage", "2", "--offload"], ["--bf16"]),
    "s2-opt-fp16-z2": (["--zero_stage", "2"], ["--bf16", "--offload"]),
    "s2-llama-fp16-z2": (["--zero_stage", "2"], ["--bf16", "--offload"]),
    "rw-eval-opt": (["--dtype", "fp16"], []),
    "prompt-eval-opt": (["--dtype", "fp16"], []),
    "s3-opt-remax-fp16": (["--enable_hybrid_engine", "--actor_zero_stage", "2",
                           "--reference_zero_stage", "3", "--reward_zero_stage", "3",
                           "--enable_test_mode", "--test_stop_step"],
                          ["--actor_bf16", "--offload", "--algo"]),
    "s3-opt-ppo-fp16-ema": (["--algo", "ppo", "--enable_hybrid_engine", "--enable_ema",
                             "--critic_model_name_or_path", "--critic_zero_stage"],
                            ["--actor_bf16", "--offload"]),
    "s3-llama-remax-bf16-offload": (["--offload", "--offload_reference_model",
                                     "--offload_reward_model", "--actor_bf16", "--reward_bf16",
                                     "--reference_zero_stage", "--reward_zero_stage",
                                     "--enable_hybrid_engine", "--enable_test_mode"], ["--algo"]),
    "s3-llama-ppo-fp16-z3-ema": (["--algo", "ppo", "--actor_zero_stage", "3", "--critic_zero_stage",
                                  "--enable_ema", "--enable_hybrid_engine", "--logit_chunk_mib"],
                                 ["--actor_bf16", "--offload"]),
    PPO_2GPU: (["--algo", "ppo", "--actor_zero_stage", "3", "--enable_ema"], ["--actor_bf16"]),
    "he-probe-opt": (["--precision", "fp16"], []),
    "he-probe-llama": (["--precision", "bf16"], []),
}


def test_dry_run_prints_every_case(dry_run):
    assert set(dry_run) == set(BY_NAME) == set(REQUIRED)
    for name, argv in dry_run.items():
        assert isinstance(argv, list), f"{name} was skipped: {argv}"
        case = BY_NAME[name]
        script_at = argv.index("scripts/peak_memory.py") + 1
        assert argv[script_at] == case.script and (ROOT / case.script).exists()
        if case.launcher:
            assert argv[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", str(case.gpus),
                                 "--master_port"]
        required, forbidden = REQUIRED[name]
        for token in required:
            assert token in argv, (name, token)
        for token in forbidden:
            assert token not in argv, (name, token)
    assert flag_value(dry_run["s3-llama-ppo-fp16-z3-ema"], "--critic_zero_stage") == "3"
    assert flag_value(dry_run[PPO_2GPU], "--num_gpus") == "2"
    # The 2-GPU case is the 1-GPU one on two GPUs.
    assert BY_NAME[PPO_2GPU].args == BY_NAME["s3-llama-ppo-fp16-z3-ema"].args


def test_dry_run_prints_the_op_builds(dry_run_output):
    line = next(line for line in dry_run_output.splitlines() if line.startswith("# op builds"))
    assert "not charged to --budget-s" in line
    ops = re.findall(r"--build-op (\w+)", line)
    assert ops == ["fused_adam", "cpu_adam", "transformer_inference"]
    assert "[2 GPUs; skipped on a node with fewer]" in dry_run_output


def test_each_case_has_a_fresh_output_dir(dry_run):
    outputs = [flag_value(argv, "--output_dir") for argv in dry_run.values()
               if isinstance(argv, list) and "--output_dir" in argv]
    assert len(outputs) == len(set(outputs)) >= 9
    assert all(not os.path.exists(path) for path in outputs)
    # Stage 3 reads the stage-1 and stage-2 outputs of the same run.
    remax = dry_run["s3-opt-remax-fp16"]
    assert flag_value(remax, "--actor_model_name_or_path") == flag_value(dry_run["s1-opt-fp16-z2"], "--output_dir")
    assert flag_value(remax, "--reward_model_name_or_path") == flag_value(dry_run["s2-opt-fp16-z2"], "--output_dir")
    ppo = dry_run["s3-llama-ppo-fp16-z3-ema"]
    assert flag_value(ppo, "--critic_model_name_or_path") == flag_value(dry_run["s2-llama-fp16-z2"], "--output_dir")


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


# ---------------------------------------------------------------- the cases follow the recipes

# Flags that decide what code a recipe runs (precision, ZeRO stages, offload, the algorithm and its
# models, EMA, the hybrid engine, checkpointing, dropout); sizes, rates and paths may differ.
STRUCTURAL = ("--algo", "--zero_stage", "--offload", "--bf16", "--actor_zero_stage",
              "--critic_zero_stage", "--reference_zero_stage", "--reward_zero_stage",
              "--offload_reference_model", "--offload_reward_model", "--actor_bf16", "--reward_bf16",
              "--enable_hybrid_engine", "--enable_ema", "--gradient_checkpointing",
              "--actor_gradient_checkpointing", "--critic_gradient_checkpointing",
              "--disable_actor_dropout", "--disable_reward_dropout", "--disable_critic_dropout",
              "--num_padding_at_beginning", "--save_at_final")
RECIPES = {  # case: (recipe, structural flags the case adds on purpose)
    "s1-opt-fp16-z2": ("step1_supervised_finetuning/training_scripts/opt/run_opt_1.3b.sh", ()),
    "s1-llama-fp16-z2-offload": ("step1_supervised_finetuning/training_scripts/llama2/run_llama2_7b.sh", ()),
    "s2-opt-fp16-z2": ("step2_reward_model_finetuning/training_scripts/opt/run_opt_350m.sh", ()),
    "s2-llama-fp16-z2": ("step2_reward_model_finetuning/training_scripts/llama2/run_llama2_7b.sh", ()),
    "s3-opt-remax-fp16": ("step3_rlhf_finetuning/training_scripts/opt/run_opt_1.3b.sh", ()),
    "s3-opt-ppo-fp16-ema": ("step3_rlhf_finetuning/training_scripts/opt/run_opt_1.3b_ppo.sh",
                            ("--save_at_final",)),
    "s3-llama-remax-bf16-offload": ("step3_rlhf_finetuning/training_scripts/llama2/run_llama2_7b.sh", ()),
    "s3-llama-ppo-fp16-z3-ema": ("step3_rlhf_finetuning/training_scripts/llama2/run_llama2_7b_ppo.sh",
                                 ("--enable_ema", "--save_at_final")),
    PPO_2GPU: ("step3_rlhf_finetuning/training_scripts/llama2/run_llama2_7b_ppo.sh",
               ("--enable_ema", "--save_at_final")),
}


def recipe_flags(path):
    """{flag: value or True} of the main.py command line of a recipe script."""
    text = (ROOT / path).read_text()
    body = text.split("main.py \\\n", 1)[1].split("2>&1", 1)[0]
    flags = {}
    for line in body.splitlines():
        parts = shlex.split(line.replace("\\", ""))
        if parts:
            flags[parts[0]] = parts[1] if len(parts) > 1 else True
    return flags


def case_flags(case):
    flags, args = {}, list(case.args)
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
            flags[arg] = value
    return flags


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_case_runs_what_its_recipe_runs(name):
    recipe, added = RECIPES[name]
    want, have = recipe_flags(recipe), case_flags(BY_NAME[name])
    assert want, recipe
    for flag in STRUCTURAL:
        expected = True if flag in added else want.get(flag)
        assert have.get(flag) == expected, (name, flag, have.get(flag), expected)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_no_flag_is_passed_twice(name):
    """argparse would take the last value without a word."""
    flags = [a for a in BY_NAME[name].args if a.startswith("--")]
    assert len(flags) == len(set(flags)), sorted(f for f in flags if flags.count(f) > 1)


def test_every_training_recipe_has_a_case():
    recipes = {str(p.relative_to(ROOT)) for p in ROOT.glob("step*/training_scripts/*/*.sh")}
    assert recipes == {recipe for recipe, _ in RECIPES.values()}


# ------------------------------------------------------------------------- verdict logic

STEP3_LOG = "\n".join(f"End-to-End => Latency: {s:.2f}s, TFLOPs: 1.00 | Generation: 0.1s"
                      for s in (3.0, 0.5, 0.7)) + "\n[precision] training in fp16 (dynamic loss scaling)"
FUSED_FP16_LOG = ("[precision] training in fp16 (dynamic loss scaling)\n"
                  "[optimizer] FusedAdam, lr 1e-06, 0.50M trainable parameters on this rank")


def write_metrics(directory, records):
    """A made-up <out>/metrics.jsonl as MetricsLog writes it (json.dumps: NaN as NaN)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(directory)


def rlhf_records(updates=2, critic=False, skipped=(), evals=True, **changes):
    """Stage-3 records: an evaluation, one record per update (and a skip record for each step in
    `skipped`), an evaluation after training. `changes`: {(step, key): value} overrides."""
    records = [{"step": 0, "epoch": 0, "eval/reward": 0.1, "eval/kl": 0.0}] if evals else []
    overflow = 0
    for step in range(updates):
        record = {"step": step, "epoch": 0, "train/reward": 0.2, "train/actor_loss": -0.01,
                  "train/kl": 0.0, "train/e2e_seconds": 1.0 + step}
        if critic:
            record["train/critic_loss"] = 0.5
        records.append(record)
        if step in skipped:
            overflow += 1
            records.append({"step": step, "train/nonfinite_skipped": 0,
                            "train/overflow_skipped": overflow})
    if evals:
        records.append({"step": updates, "epoch": 0, "eval/reward": 0.3, "eval/kl": 0.01})
    for (step, key), value in changes.get("changes", {}).items():
        next(r for r in records if r["step"] == step and "train/reward" in r)[key] = value
    return records


def sft_records(eval_keys=("Test/ppl", "Test/loss"), steps=5, final_eval=True):
    records = [{"step": 0, "epoch": 0, **{k: 500.0 for k in eval_keys}}]
    records += [{"step": s, "epoch": 1, "Train/loss": 6.2, "Train/lr": 1e-3} for s in range(1, steps + 1)]
    if final_eval:
        records.append({"step": steps, "epoch": 1, **{k: 480.0 for k in eval_keys}})
    return records


def test_seconds_per_step_is_the_median_without_the_first_step():
    assert seconds_per_step(STEP3_LOG) == pytest.approx(0.6)
    assert seconds_per_step("Model Parameters: 0.001 B, Latency: 0.25s, TFLOPs: 0.01") == 0.25
    assert seconds_per_step("no steps here") is None
    # Stage 3's own numbers when its metrics have them (the first update left out).
    records = rlhf_records(updates=3)
    assert seconds_per_step(STEP3_LOG, records) == pytest.approx(2.5)


REMAX = "s3-opt-remax-fp16"
PPO = "s3-llama-ppo-fp16-z3-ema"
PPO_FILES = ("actor/model.safetensors", "actor_ema/model.safetensors", "critic/config.json")


def ppo_out(tmp_path, records=None):
    out = write_metrics(tmp_path / "ppo", rlhf_records(critic=True) if records is None else records)
    for relative in PPO_FILES:
        (Path(out) / relative).parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / relative).write_text("x")
    return out


@pytest.mark.parametrize("records, problem", [
    (rlhf_records(), None),
    (rlhf_records(changes={(1, "train/reward"): float("nan")}), "train/reward is nan at update 1"),
    (rlhf_records(changes={(0, "train/actor_loss"): float("inf")}), "train/actor_loss is inf"),
    ([r for r in rlhf_records(updates=3) if r["step"] != 1 or "train/reward" not in r],
     "update 1 is missing"),
    (rlhf_records(updates=1), "1 applied update(s) logged (1 in all), --test_stop_step is 2"),
    (rlhf_records(updates=3), "3 applied update(s)"),
    (rlhf_records(updates=3, skipped=(0,)), None),   # an fp16 overflow comes on top of the two
    (rlhf_records(updates=2, skipped=(0,)), "1 applied update(s) logged (2 in all)"),
    (rlhf_records(evals=False), "no eval/reward record"),
    (rlhf_records()[:-1], "no evaluation after the last update"),
    ([], "no train/reward record"),
])
def test_stage3_metrics(records, problem, tmp_path):
    out = write_metrics(tmp_path / "out", records)
    status, _, note = judge(BY_NAME[REMAX], 0, FUSED_FP16_LOG, [False, "x"], out)
    if problem is None:
        assert status == PASS, note
        assert note.startswith("2 updates")
    else:
        assert status == FAIL and problem in note, note


def test_stage3_metrics_note_an_overflow_skip(tmp_path):
    out = write_metrics(tmp_path / "out", rlhf_records(updates=3, skipped=(0,)))
    assert judge(BY_NAME[REMAX], 0, FUSED_FP16_LOG, None, out) == (
        PASS, "not reached", "2 updates (+1 skipped for fp16 overflow)")


def test_stage3_a_nonfinite_skip_fails(tmp_path):
    records = rlhf_records(updates=3, skipped=(1,))
    next(r for r in records if "train/nonfinite_skipped" in r)["train/nonfinite_skipped"] = 1
    status, _, note = judge(BY_NAME[REMAX], 0, FUSED_FP16_LOG, None, write_metrics(tmp_path, records))
    assert status == FAIL and "skipped for a non-finite loss" in note


def test_ppo_needs_a_finite_critic_loss_and_its_exports(tmp_path):
    assert judge(BY_NAME[PPO], 0, FUSED_FP16_LOG, None, ppo_out(tmp_path))[0] == PASS
    # ReMax's records have no critic loss: a PPO run without one fails.
    status, _, note = judge(BY_NAME[PPO], 0, FUSED_FP16_LOG, None, ppo_out(tmp_path, rlhf_records()))
    assert status == FAIL and "train/critic_loss is missing at update 0" in note
    nan_critic = rlhf_records(critic=True, changes={(1, "train/critic_loss"): float("nan")})
    assert "train/critic_loss is nan" in judge(BY_NAME[PPO], 0, FUSED_FP16_LOG, None,
                                              ppo_out(tmp_path, nan_critic))[2]
    # The EMA copy is exported (--save_at_final): its absence fails even with good metrics.
    out = ppo_out(tmp_path)
    os.remove(os.path.join(out, "actor_ema", "model.safetensors"))
    status, _, note = judge(BY_NAME[PPO], 0, FUSED_FP16_LOG, None, out)
    assert status == FAIL and "actor_ema/model.safetensors" in note


@pytest.mark.parametrize("case, records, problem", [
    ("s1-opt-fp16-z2", sft_records(), None),
    ("s1-opt-fp16-z2", sft_records()[:-1] + [dict(sft_records()[-1], **{"Test/ppl": float("nan")})],
     "Test/ppl is nan at step 5"),
    ("s1-opt-fp16-z2", [dict(r, **{"Train/loss": float("nan")}) if "Train/loss" in r and r["step"] == 3 else r
                        for r in sft_records()], "Train/loss is nan at step 3"),
    ("s1-opt-fp16-z2", sft_records(final_eval=False), "no evaluation after the last training step"),
    ("s1-opt-fp16-z2", sft_records(steps=0), "no Train/loss record"),
    ("s1-opt-fp16-z2", sft_records() + [{"step": 5, "Train/nonfinite_skipped": 1,
                                         "Train/overflow_skipped": 0}], "non-finite loss"),
    ("s1-opt-fp16-z2", sft_records() + [{"step": 2, "Train/nonfinite_skipped": 0,
                                         "Train/overflow_skipped": 1}], None),   # fp16 loss scaling
    ("s2-opt-fp16-z2", sft_records(("Test/acc", "Test/reward_score", "Test/rejected_score")), None),
    ("s2-opt-fp16-z2", sft_records(("Test/reward_score",)), "Test/acc is missing at step 0"),
    ("s2-opt-fp16-z2", sft_records(("Test/ppl",)), "no evaluation (Test/acc, Test/reward_score)"),
])
def test_stage12_metrics(case, records, problem, tmp_path):
    out = write_metrics(tmp_path / "out", records)
    status, _, note = judge(BY_NAME[case], 0, FUSED_FP16_LOG, None, out)
    if problem is None:
        assert status == PASS, note
    else:
        assert status == FAIL and problem in note, note


def test_metrics_file_missing_or_broken(tmp_path):
    status, _, note = judge(BY_NAME["s1-opt-fp16-z2"], 0, FUSED_FP16_LOG, None, str(tmp_path))
    assert status == FAIL and "no metrics.jsonl" in note
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "Train/lo\n')
    assert "line 2 is not JSON" in judge(BY_NAME["s1-opt-fp16-z2"], 0, FUSED_FP16_LOG, None,
                                         str(tmp_path))[2]
    # A case whose script writes no metrics (the eval scripts) is judged by its output alone.
    assert judge(BY_NAME["rw-eval-opt"], 0, "Eval result: acc 0.5", None)[0] == PASS


def test_log_checks_only_for_what_the_metrics_cannot_show(tmp_path):
    """The optimizer and the precision line: good metrics with CPU Adam in a FusedAdam case fail."""
    out = write_metrics(tmp_path / "out", sft_records())
    case = BY_NAME["s1-opt-fp16-z2"]
    assert judge(case, 0, FUSED_FP16_LOG, None, out)[0] == PASS
    status, _, note = judge(case, 0, FUSED_FP16_LOG.replace("FusedAdam", "DeepSpeedCPUAdam"), None, out)
    assert status == FAIL and "[optimizer] FusedAdam" in note
    status, _, note = judge(BY_NAME["s1-llama-fp16-z2-offload"], 0, FUSED_FP16_LOG, None, out)
    assert status == FAIL and "DeepSpeedCPUAdam" in note
    # No step-log text is needed: the metrics show the updates ran.
    remax_out = write_metrics(tmp_path / "remax", rlhf_records())
    assert "End-to-End" not in FUSED_FP16_LOG
    assert judge(BY_NAME[REMAX], 0, FUSED_FP16_LOG, None, remax_out)[0] == PASS


@pytest.mark.parametrize("returncode, log, status, note", [
    (0, FUSED_FP16_LOG, PASS, "2 updates"),
    (0, "[optimizer] FusedAdam", FAIL, "[precision] training in fp16"),
    (1, "RuntimeError: Error building extension 'fused_adam'", ENV_MISSING, "Error building extension"),
    (1, "ModuleNotFoundError: No module named 'hjson'", ENV_MISSING, "hjson"),
    (1, "ModuleNotFoundError: No module named 'utils.missing'", FAIL, "exit status 1"),
    (1, "ModuleNotFoundError: No module named 'sampling'", FAIL, "exit status 1"),
    (1, "Traceback ... ValueError: bad", FAIL, "exit status 1"),
])
def test_judge_status(returncode, log, status, note, tmp_path):
    out = write_metrics(tmp_path / "out", rlhf_records())
    got_status, _, got_note = judge(BY_NAME[REMAX], returncode, log, [False, "why"], out)
    assert got_status == status and note in got_note


def test_judge_timeouts():
    case = BY_NAME["s1-opt-fp16-z2"]
    assert judge(case, -9, "", None, timed_out=True)[0] == FAIL
    assert judge(case, -9, "", None, timed_out=True, budget_stop=True)[0] == SKIP


HE_ON_CONFIG = "[INFO] hybrid_engine ................ enabled=True max_out_tokens=48"
FALLBACK = ("[hybrid-engine check] --enable_hybrid_engine is ignored for /x: DeepSpeed would replace "
            "OPTDecoderLayer ... Generation falls back to the Hugging Face path")


@pytest.mark.parametrize("log, status, verdict", [
    (FUSED_FP16_LOG + "\n" + FALLBACK, PASS, "fallback to HF generate"),
    (FUSED_FP16_LOG + "\n" + HE_ON_CONFIG, FAIL, "kernels on, check says incompatible"),
    (FUSED_FP16_LOG + "\n" + HE_ON_CONFIG + "\nNo compatible DeepSpeed inference policy found", PASS,
     "HF generate (DeepSpeed has no policy)"),
])
def test_hybrid_engine_column_of_a_recipe_case(log, status, verdict, tmp_path):
    out = write_metrics(tmp_path / "out", rlhf_records())
    got_status, got_verdict, note = judge(BY_NAME[REMAX], 0, log, [False, "why"], out)
    assert got_status == status and got_verdict.startswith(verdict)
    if status == FAIL:
        assert "model_path" in note


def test_hybrid_engine_column_when_the_check_passes(tmp_path):
    out = write_metrics(tmp_path / "out", rlhf_records())
    _, verdict, _ = judge(BY_NAME[REMAX], 0, FUSED_FP16_LOG + HE_ON_CONFIG, [True, "ok"], out)
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
    builds = {"fused_adam": Build("fused_adam", gpu_smoke.BUILT, 47.2),
              "cpu_adam": Build("cpu_adam", gpu_smoke.CACHED, 1.6)}
    table = format_table([Result("s1-opt-fp16-z2", PASS, 0.0321, 3 * 2 ** 20, "-", 12.4),
                          Result("he-probe-opt", ENV_MISSING, note="no nvcc")], builds).splitlines()
    assert [c.strip() for c in table[0].split("|")] == ["case", "result", "s/step", "peak GPU mem",
                                                       "hybrid engine", "wall s", "note"]
    assert [c.strip() for c in table[2].split("|")] == ["s1-opt-fp16-z2", "pass", "0.032", "3 MiB",
                                                       "-", "12", ""]
    assert [c.strip() for c in table[3].split("|")][:2] == ["he-probe-opt", "env-missing"]
    assert table[-2] == "1 pass, 0 fail, 1 env-missing, 0 skip"
    assert table[-1] == ("op builds, before the cases (not charged to --budget-s): fused_adam: built "
                         "in 47s (JIT build, now cached); cpu_adam: loaded from the JIT cache in 2s")
    assert format_table([Result("a", PASS)]).splitlines()[-1] == "1 pass, 0 fail, 0 env-missing, 0 skip"


# ---------------------------------------------------------------------------- environment

GPU_ENV = {"missing_modules": [], "cuda": True, "gpu_count": 1, "capability": "9.0", "ninja": True,
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
    ("s1-llama-fp16-z2-offload", {"nvcc": None}, None),  # CPU Adam needs a C++ compiler only
    ("s3-llama-remax-bf16-offload", {"nvcc": None}, None),
    ("s3-llama-remax-bf16-offload", {"cxx": None}, "no a C++ compiler"),
    ("s3-opt-remax-fp16", {"nvcc": None, "prebuilt_ops": ["fused_adam"]}, None),  # falls back
    ("s3-opt-remax-fp16", {"nvcc": None, "prebuilt_ops": ["fused_adam"],
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
    """The real (not dry) run here: no CUDA, so env-missing rows, no op build and exit status 0."""
    proc = run_smoke(["--only", "he-probe-opt,rw-eval-opt"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("he-probe-opt", "rw-eval-opt", "s"))]
    statuses = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in rows if "|" in line}
    assert statuses == {"he-probe-opt": ENV_MISSING, "rw-eval-opt": ENV_MISSING,
                        "s1-opt-fp16-z2": ENV_MISSING, "s2-opt-fp16-z2": ENV_MISSING}
    assert "0 fail" in proc.stdout and "[build]" not in proc.stdout
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["builds"] == [] and len(summary["results"]) == 4


def test_build_only_on_this_cpu_machine(tmp_path):
    proc = run_smoke(["--build-only", "--only", "s1-opt-fp16-z2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[build] nothing to build" in proc.stdout and "s1-opt-fp16-z2 |" not in proc.stdout


def fake_runner(ran, fail=()):
    def fake_run(case, command, paths, env_extra, timeout_s):
        ran.append(case.name)
        return (1, "boom", 1.0, None, False) if case.name in fail else (0, "", 1.0, None, False)
    return fake_run


def test_dependencies_and_selection(monkeypatch, tmp_path):
    assert selected_cases("s3-opt-remax-fp16") == {"s3-opt-remax-fp16", "s1-opt-fp16-z2",
                                                   "s2-opt-fp16-z2"}
    assert selected_cases(PPO_2GPU) == {PPO_2GPU, "s1-llama-fp16-z2-offload", "s2-llama-fp16-z2"}
    ran = []
    monkeypatch.setattr(gpu_smoke, "run_case", fake_runner(ran, fail=("s1-opt-fp16-z2",)))
    monkeypatch.setattr(gpu_smoke, "build_inputs", lambda paths: {})
    paths = gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run"))
    planned = gpu_smoke.plan(selected_cases("rw-eval-opt"), paths)
    results = {r.case: r for r in gpu_smoke.run_all(planned, paths, GPU_ENV, 100, start=0)}
    assert ran == []  # started at the epoch: the budget was spent before the first case
    assert all(r.status == SKIP for r in results.values())
    assert "time budget" in results["s1-opt-fp16-z2"].note
    results = {r.case: r for r in gpu_smoke.run_all(planned, paths, GPU_ENV, 100, start=time.time())}
    assert ran == ["s1-opt-fp16-z2"]
    assert results["s1-opt-fp16-z2"].status == FAIL
    assert results["s2-opt-fp16-z2"].status == SKIP and "needs s1-opt-fp16-z2" in results["s2-opt-fp16-z2"].note


def two_gpu_results(monkeypatch, tmp_path, gpu_count):
    ran = []
    monkeypatch.setattr(gpu_smoke, "run_case", fake_runner(ran))
    monkeypatch.setattr(gpu_smoke, "build_inputs", lambda paths: {})
    monkeypatch.setattr(gpu_smoke, "judge", lambda case, *a, **k: (PASS, "-", ""))
    paths = gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run"))
    planned = gpu_smoke.plan(selected_cases(PPO_2GPU), paths)
    env = dict(GPU_ENV, gpu_count=gpu_count)
    return {r.case: r for r in gpu_smoke.run_all(planned, paths, env, 100, time.time())}, ran


def test_a_two_gpu_case_is_skipped_on_a_one_gpu_node(monkeypatch, tmp_path):
    results, ran = two_gpu_results(monkeypatch, tmp_path, gpu_count=1)
    assert results[PPO_2GPU].status == SKIP
    assert results[PPO_2GPU].note == "needs 2 GPUs, the node has 1"
    assert PPO_2GPU not in ran and "s2-llama-fp16-z2" in ran
    results, ran = two_gpu_results(monkeypatch, tmp_path, gpu_count=2)
    assert results[PPO_2GPU].status == PASS and PPO_2GPU in ran
    # The 2-GPU case needs no op build the node would not do anyway.
    planned = gpu_smoke.plan({PPO_2GPU}, gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "r")))
    assert gpu_smoke.ops_to_build(planned, dict(GPU_ENV, gpu_count=1)) == []
    assert gpu_smoke.ops_to_build(planned, dict(GPU_ENV, gpu_count=2)) == ["fused_adam"]


# ------------------------------------------------------------------------------- op builds

def all_planned(tmp_path):
    return gpu_smoke.plan(set(gpu_smoke.CASE_NAMES),
                          gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run")))


@pytest.mark.parametrize("changes, ops", [
    ({}, ["fused_adam", "cpu_adam", "transformer_inference"]),
    ({"prebuilt_ops": ["fused_adam", "transformer_inference"]}, ["cpu_adam"]),
    ({"nvcc": None}, ["cpu_adam"]),          # the CUDA ops' cases are env-missing: nothing to build
    ({"cuda": False}, []),
    ({"missing_modules": ["deepspeed"]}, []),
])
def test_ops_to_build(changes, ops, tmp_path):
    assert gpu_smoke.ops_to_build(all_planned(tmp_path), dict(GPU_ENV, **changes)) == ops


def test_ops_to_build_follows_the_selection(tmp_path):
    paths = gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run"))
    planned = gpu_smoke.plan(selected_cases("s3-llama-remax-bf16-offload"), paths)
    assert gpu_smoke.ops_to_build(planned, GPU_ENV) == ["fused_adam", "cpu_adam"]
    planned = gpu_smoke.plan(selected_cases("he-probe-llama"), paths)
    assert gpu_smoke.ops_to_build(planned, GPU_ENV) == ["transformer_inference"]


@pytest.mark.parametrize("returncode, log, timed_out, status, note", [
    (0, 'x\nSMOKE_BUILD {"op": "fused_adam", "cached_before": false, "ok": true}', False,
     gpu_smoke.BUILT, ""),
    (0, 'SMOKE_BUILD {"op": "fused_adam", "cached_before": true, "ok": true}', False,
     gpu_smoke.CACHED, ""),
    (1, 'SMOKE_BUILD {"op": "fused_adam", "ok": false, "error": "RuntimeError: Error building '
        'extension \'fused_adam\'"}', False, gpu_smoke.BUILD_FAILED, "Error building extension"),
    (-9, "", True, gpu_smoke.BUILD_TIMED_OUT, "not built in 900s"),
    (1, "Traceback ... ninja is required to load C++ extensions", False, gpu_smoke.BUILD_FAILED,
     "ninja is required"),
])
def test_build_result(returncode, log, timed_out, status, note):
    build = gpu_smoke.build_result("fused_adam", returncode, log, 12.0, timed_out, 900)
    assert build.status == status and note in build.note and build.seconds == 12.0


def test_build_ops_runs_one_child_per_op_with_the_cases_environment(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_logged(command, log_path, env, timeout_s):
        calls.append((command, env, timeout_s))
        op = command[-1]
        ok = op != "cpu_adam"
        return (0 if ok else 1, "SMOKE_BUILD " + json.dumps({"op": op, "ok": ok, "cached_before": False,
                                                             "error": "RuntimeError: no compiler"}),
                30.0, False)

    monkeypatch.setattr(gpu_smoke, "run_logged", fake_logged)
    paths = gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run"))
    extra = gpu_smoke.case_env_extra(GPU_ENV)
    builds = gpu_smoke.build_ops(["fused_adam", "cpu_adam"], paths, extra, 600)
    assert [c[0][-2:] for c in calls] == [["--build-op", "fused_adam"], ["--build-op", "cpu_adam"]]
    assert all(c[1]["DS_ACCELERATOR"] == "cuda" and c[1]["TORCH_CUDA_ARCH_LIST"] == "9.0" and
               c[2] == 600 for c in calls)
    assert builds["fused_adam"].status == gpu_smoke.BUILT
    assert builds["cpu_adam"].status == gpu_smoke.BUILD_FAILED
    printed = capsys.readouterr().out
    assert "[build] fused_adam: built in 30s (JIT build, now cached)" in printed
    assert "[build] cpu_adam: failed after 30s: RuntimeError: no compiler" in printed
    # The cases' clock starts after the builds: they are not charged to --budget-s.
    assert gpu_smoke.budget_clock_start(100.0, builds) == 160.0


def test_cases_whose_op_did_not_build(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(gpu_smoke, "run_case", fake_runner(ran))
    monkeypatch.setattr(gpu_smoke, "build_inputs", lambda paths: {})
    monkeypatch.setattr(gpu_smoke, "judge", lambda case, *a, **k: (PASS, "-", ""))
    paths = gpu_smoke.run_paths(str(tmp_path), str(tmp_path / "run"))
    planned = gpu_smoke.plan(selected_cases("s3-llama-remax-bf16-offload,he-probe-opt"), paths)
    builds = {"fused_adam": Build("fused_adam", gpu_smoke.BUILD_FAILED, 5.0, "RuntimeError: nvcc fatal"),
              "cpu_adam": Build("cpu_adam", gpu_smoke.CACHED, 1.0),
              "transformer_inference": Build("transformer_inference", gpu_smoke.BUILD_TIMED_OUT, 900.0,
                                             "not built in 900s")}
    results = {r.case: r for r in gpu_smoke.run_all(planned, paths, GPU_ENV, 100, time.time(), builds)}
    assert ran == ["s1-llama-fp16-z2-offload"]  # the only case whose op is there
    assert results["s2-llama-fp16-z2"].status == ENV_MISSING
    assert results["s2-llama-fp16-z2"].note == ("building fused_adam failed: RuntimeError: nvcc fatal "
                                                "(logs/build-fused_adam.log)")
    # Its own op (cpu_adam) is there, but it reads the stage-2 output.
    assert results["s3-llama-remax-bf16-offload"].status == ENV_MISSING
    assert results["s3-llama-remax-bf16-offload"].note == "needs s2-llama-fp16-z2 (env-missing)"
    assert results["he-probe-opt"].status == SKIP and "did not finish" in results["he-probe-opt"].note


def test_build_op_child_reports_json(monkeypatch, capsys):
    """The child's side (`--build-op`), with a stand-in for DeepSpeed's accelerator."""
    loaded = []

    class Builder:
        name = "fused_adam"

        def load(self, verbose=False):
            loaded.append(verbose)

    class Accelerator:
        def __init__(self, builders):
            self.builders = builders

        def create_op_builder(self, class_name):  # DeepSpeed's returns an instance, or None
            builder = self.builders.get(class_name)
            return builder() if builder else None

        def device_name(self):
            return "cuda"

    def use(accelerator):
        package = types.ModuleType("deepspeed")
        module = types.ModuleType("deepspeed.accelerator")
        module.get_accelerator = lambda: accelerator
        package.accelerator = module
        monkeypatch.setitem(sys.modules, "deepspeed", package)
        monkeypatch.setitem(sys.modules, "deepspeed.accelerator", module)

    use(Accelerator({"FusedAdamBuilder": Builder}))
    monkeypatch.setattr(gpu_smoke, "jit_cache_has", lambda name: False)
    assert gpu_smoke.main(["--build-op", "fused_adam"]) == 0
    report = json.loads(capsys.readouterr().out.strip().split("SMOKE_BUILD ", 1)[1])
    assert report["ok"] and report["cached_before"] is False and loaded == [True]
    use(Accelerator({}))
    assert gpu_smoke.main(["--build-op", "cpu_adam"]) == 1
    report = json.loads(capsys.readouterr().out.strip().split("SMOKE_BUILD ", 1)[1])
    assert not report["ok"] and "has no CPUAdamBuilder" in report["error"]


# ----------------------------------------------------------------------------- peak_memory.py

def test_peak_memory_wrapper_hands_on_argv_and_writes_stats(tmp_path):
    target = tmp_path / "target.py"
    target.write_text("import json, sys, torch\n"
                      "json.dump({'argv': sys.argv, 'path0': sys.path[0]}, open(sys.argv[-1], 'w'))\n"
                      "sys.exit(3)\n")
    seen, stats = tmp_path / "seen.json", tmp_path / "stats.json"
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "peak_memory.py"), "--local_rank=0",
                           str(target), "--flag", str(seen)], env=dict(env, SMOKE_STATS_FILE=str(stats)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the target's exit status
    assert json.loads(seen.read_text()) == {"argv": [str(target), "--local_rank=0", "--flag", str(seen)],
                                            "path0": str(tmp_path)}
    assert json.loads(stats.read_text())["max_memory_allocated"] is None  # no CUDA here


def test_each_rank_writes_its_own_stats_and_the_table_takes_the_largest(tmp_path):
    path = str(tmp_path / "case.json")
    assert peak_memory.rank_stats_path(path, {}) == path
    assert peak_memory.rank_stats_path(path, {"RANK": "0"}) == path
    assert peak_memory.rank_stats_path(path, {"RANK": "1"}) == path + ".rank1"
    assert gpu_smoke.peak_memory_of(path) is None
    Path(path).write_text(json.dumps({"max_memory_allocated": 100}))
    Path(path + ".rank1").write_text(json.dumps({"max_memory_allocated": 250}))
    Path(path + ".rank2").write_text("{broken")
    assert gpu_smoke.peak_memory_of(path) == 250
