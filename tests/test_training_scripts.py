"""The eight training scripts: syntax, the original's exact hyper-parameters, the launcher's port
(MASTER_PORT, else the script's own), and that every flag they pass is one their stage's main.py
accepts.

A stub `deepspeed` first on PATH records its argv, working directory and environment instead of
launching anything, so these tests take seconds and need no model or data.
"""
import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# flag -> value as the original's scripts pass it; `on`: switches passed; `off`: flags never passed.
COMMON = {"--data_split": "2,4,4", "--lr_scheduler_type": "cosine", "--num_warmup_steps": 0,
          "--gradient_accumulation_steps": 1}
STEP12 = {**COMMON, "--per_device_train_batch_size": 16, "--per_device_eval_batch_size": 16,
          "--max_seq_len": 512, "--learning_rate": 1e-5, "--zero_stage": 2}
STEP12_ON = ["--gradient_checkpointing", "--deepspeed", "--enable_tensorboard", "--print_loss"]
STEP3 = {**COMMON, "--generation_batches": 1, "--ppo_epochs": 1, "--max_prompt_seq_len": 256,
         "--max_answer_seq_len": 256, "--actor_learning_rate": 1e-6, "--actor_weight_decay": 0.1,
         "--num_train_epochs": 1, "--kl_ctl": 0.05, "--gamma": 0.99, "--actor_zero_stage": 2,
         "--reward_zero_stage": 3, "--reference_zero_stage": 3, "--seed": 2023}
STEP3_ON = ["--actor_gradient_checkpointing", "--disable_actor_dropout", "--disable_reward_dropout",
            "--enable_hybrid_engine", "--deepspeed", "--enable_tensorboard", "--print_answers",
            "--save_answers"]
STEP3_OFFLOAD = ["--offload", "--offload_reference_model", "--offload_reward_model"]
PPO = {**COMMON, "--algo": "ppo", "--generation_batches": 1, "--ppo_epochs": 1,
       "--max_prompt_seq_len": 256, "--max_answer_seq_len": 256, "--actor_learning_rate": 9.65e-6,
       "--critic_learning_rate": 5e-6, "--num_train_epochs": 1, "--num_warmup_steps": 100,
       "--seed": 1234}
STEP3_BF16 = ["--actor_bf16", "--reward_bf16"]

SCRIPTS = {
    "step1-opt": dict(
        path="step1_supervised_finetuning/training_scripts/opt/run_opt_1.3b.sh", port=12346,
        values={**STEP12, "--weight_decay": 0, "--num_train_epochs": 4, "--seed": 2023,
                "--data_output_path": "/tmp/data_files/opt"},
        on=STEP12_ON, off=["--offload", "--bf16", "--lora_dim"],
        default_dir=r"step1_sft-facebook_opt-1\.3b-{ts}-2023"),
    "step1-llama2": dict(
        path="step1_supervised_finetuning/training_scripts/llama2/run_llama2_7b.sh", port=12354,
        values={**STEP12, "--weight_decay": 0, "--num_train_epochs": 2,
                "--data_output_path": "/tmp/data_files/llama2"},
        on=STEP12_ON + ["--offload"], off=["--bf16", "--seed"],
        parsed={"seed": 2023},  # not passed: the default
        default_dir=r"step1_sft-meta-llama_Llama-2-7b-hf-{ts}-2023"),
    "step2-opt": dict(
        path="step2_reward_model_finetuning/training_scripts/opt/run_opt_350m.sh", port=12349,
        values={**STEP12, "--weight_decay": 0.1, "--num_train_epochs": 4, "--seed": 1234,
                "--num_padding_at_beginning": 1, "--data_output_path": "/tmp/data_files/opt"},
        on=STEP12_ON, off=["--offload", "--bf16"],
        default_dir=r"step2_reward-facebook_opt-350m-{ts}-1234"),
    "step2-llama2": dict(
        path="step2_reward_model_finetuning/training_scripts/llama2/run_llama2_7b.sh", port=12348,
        values={**STEP12, "--weight_decay": 0.1, "--num_train_epochs": 2, "--seed": 1234,
                "--num_padding_at_beginning": 0, "--data_output_path": "/tmp/data_files/llama2"},
        on=STEP12_ON, off=["--offload", "--bf16"],
        default_dir=r"step2_reward-meta-llama_Llama-2-7b-hf-{ts}-1234"),
    "step3-opt": dict(
        path="step3_rlhf_finetuning/training_scripts/opt/run_opt_1.3b.sh", port=12346,
        values={**STEP3, "--num_padding_at_beginning": 1, "--per_device_generation_batch_size": 4,
                "--per_device_training_batch_size": 4, "--per_device_eval_batch_size": 4,
                "--data_output_path": "/tmp/data_files/opt"},
        on=STEP3_ON, off=STEP3_OFFLOAD + STEP3_BF16 + ["--save_at_final", "--target_kl"],
        parsed={"target_kl": 1.0},
        default_dir=r"step3_remax-facebook_opt_1\.3b-{ts}-2023"),
    "step3-llama2": dict(
        path="step3_rlhf_finetuning/training_scripts/llama2/run_llama2_7b.sh", port=12346,
        values={**STEP3, "--num_padding_at_beginning": 0, "--per_device_generation_batch_size": 1,
                "--per_device_training_batch_size": 1, "--per_device_eval_batch_size": 1,
                "--data_output_path": "/tmp/data_files/llama2"},
        on=STEP3_ON + STEP3_OFFLOAD + STEP3_BF16 + ["--save_at_final"], off=["--target_kl"],
        parsed={"target_kl": 1.0},
        default_dir=r"step3_remax-meta_llama_Llama_2_7b_hf-{ts}-2023"),
    # DeepSpeed-Chat's PPO recipes for the same models (the paper's baseline)
    "step3-opt-ppo": dict(
        path="step3_rlhf_finetuning/training_scripts/opt/run_opt_1.3b_ppo.sh", port=12346,
        values={**PPO, "--num_padding_at_beginning": 1, "--per_device_generation_batch_size": 4,
                "--per_device_training_batch_size": 4, "--per_device_eval_batch_size": 4,
                "--actor_zero_stage": 2, "--critic_zero_stage": 2, "--reference_zero_stage": 0,
                "--reward_zero_stage": 0, "--data_output_path": "/tmp/data_files/opt"},
        on=["--disable_actor_dropout", "--enable_hybrid_engine", "--enable_ema", "--deepspeed",
            "--enable_tensorboard"],
        off=STEP3_OFFLOAD + STEP3_BF16 + ["--actor_gradient_checkpointing", "--gamma", "--kl_ctl"],
        parsed={"gamma": 1.0, "kl_ctl": 0.1, "lam": 0.95, "cliprange": 0.2,
                "cliprange_value": 0.2, "num_samples_per_prompt": 1},
        default_dir=r"step3_ppo-facebook_opt_1\.3b-{ts}-1234"),
    "step3-llama2-ppo": dict(
        path="step3_rlhf_finetuning/training_scripts/llama2/run_llama2_7b_ppo.sh", port=12346,
        values={**PPO, "--num_padding_at_beginning": 0, "--per_device_generation_batch_size": 1,
                "--per_device_training_batch_size": 1, "--per_device_eval_batch_size": 1,
                "--actor_weight_decay": 0.1, "--critic_weight_decay": 0.1,
                "--actor_zero_stage": 3, "--critic_zero_stage": 3, "--reference_zero_stage": 3,
                "--reward_zero_stage": 3, "--data_output_path": "/tmp/data_files/llama2"},
        on=["--actor_gradient_checkpointing", "--critic_gradient_checkpointing",
            "--disable_actor_dropout", "--offload_reference_model", "--enable_hybrid_engine",
            "--deepspeed"],
        off=["--offload", "--offload_reward_model"] + STEP3_BF16 + ["--gamma", "--kl_ctl"],
        parsed={"gamma": 1.0, "kl_ctl": 0.1},
        default_dir=r"step3_ppo-meta_llama_Llama_2_7b_hf-{ts}-1234"),
}
PATH_VARS = ("MODEL_PATH", "ACTOR_MODEL_PATH", "REWARD_MODEL_PATH", "DATA_PATH", "DATA_OUTPUT_PATH")
# Read by every script (the launcher's --master_port); not inherited from the caller's environment.
SCRIPT_VARS = PATH_VARS + ("MASTER_PORT",)

STUB = """#!/bin/sh
pwd > "$STUB_DIR/cwd"
env > "$STUB_DIR/env"
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$STUB_DIR/argv"
echo "stub deepspeed ran"
exit "${STUB_EXIT:-0}"
"""


def stage_dir(name):
    return ROOT / SCRIPTS[name]["path"].split("/")[0]


def make_stub(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "deepspeed"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record"
    record.mkdir()
    return bin_dir, record


def run_script(script, tmp_path, args=(), env_extra=None, cwd=None):
    """Run `bash script args` with the stub deepspeed; return (process, argv list, record dir)."""
    bin_dir, record = make_stub(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_DIR=str(record))
    env.update(env_extra or {})
    proc = subprocess.run(["bash", str(script), *args], cwd=cwd or tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    argv_file = record / "argv"
    argv = argv_file.read_text().splitlines() if argv_file.exists() else None
    return proc, argv, record


def launcher_and_main_args(argv):
    """Split the recorded argv at main.py: (launcher args, main.py args)."""
    assert "main.py" in argv, argv
    i = argv.index("main.py")
    return argv[:i], argv[i + 1:]


def flag_values(main_args):
    """{flag: [values...]} of a main.py command line."""
    flags, current = {}, None
    for arg in main_args:
        if arg.startswith("--"):
            assert arg not in flags, f"{arg} is passed twice"
            current = flags.setdefault(arg, [])
        else:
            assert current is not None, f"value {arg!r} before any flag"
            current.append(arg)
    return flags


def same(value, expected):
    value = getattr(value, "value", value)  # enums such as SchedulerType
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return float(value) == float(expected)
    return str(value) == str(expected)


def load_stage_main(directory):
    """The stage's main.py as a module; skips only when the file does not exist yet."""
    path = directory / "main.py"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} does not exist yet")
    spec = importlib.util.spec_from_file_location(f"_main_of_{directory.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=sorted(SCRIPTS))
def name(request):
    return request.param


@pytest.fixture
def launched(name, tmp_path):
    """The script run from elsewhere with a relative output dir and every path from the environment."""
    paths = {var: str(tmp_path / "paths" / var.lower()) for var in PATH_VARS
             if var != "DATA_OUTPUT_PATH"}  # kept at its default (the original's cache dir)
    paths["DATA_PATH"] = str(tmp_path / "paths" / "Dahoas" / "rm-static")
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    caller = tmp_path / "caller"
    caller.mkdir()
    proc, argv, record = run_script(ROOT / SCRIPTS[name]["path"], tmp_path, ["out"], paths, caller)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert argv is not None, f"deepspeed was never called:\n{proc.stdout[-3000:]}"
    return dict(argv=argv, record=record, paths=paths, caller=caller, output=proc.stdout)


def test_syntax(name):
    proc = subprocess.run(["bash", "-n", str(ROOT / SCRIPTS[name]["path"])], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_launch_line_and_hyper_parameters(name, launched):
    spec = SCRIPTS[name]
    launcher_args, main_args = launcher_and_main_args(launched["argv"])
    assert launcher_args == ["--master_port", str(spec["port"])]
    flags = flag_values(main_args)
    for flag, expected in spec["values"].items():
        assert flag in flags, f"{flag} is not passed"
        assert len(flags[flag]) == 1 and same(flags[flag][0], expected), \
            f"{flag} {flags[flag]} != {expected}"
    for flag in spec["on"]:
        assert flags.get(flag) == [], f"switch {flag} is not passed (or takes a value)"
    for flag in spec["off"]:
        assert flag not in flags, f"{flag} must not be passed"
    # everything else passed is a path the test gave (or the output dir)
    extra = set(flags) - set(spec["values"]) - set(spec["on"])
    assert extra <= {"--data_path", "--model_name_or_path", "--actor_model_name_or_path",
                     "--reward_model_name_or_path", "--critic_model_name_or_path",
                     "--output_dir"}, extra


@pytest.mark.parametrize("port", ["23456", ""])
def test_master_port_comes_from_the_environment(name, tmp_path, port):
    """MASTER_PORT picks the launcher's port (two runs on one node need two ports); unset or
    empty, the script's own default."""
    proc, argv, _ = run_script(ROOT / SCRIPTS[name]["path"], tmp_path, [str(tmp_path / "out")],
                               {"MASTER_PORT": port})
    assert proc.returncode == 0, proc.stdout[-3000:]
    launcher_args, _ = launcher_and_main_args(argv)
    assert launcher_args == ["--master_port", port or str(SCRIPTS[name]["port"])]


def test_paths_come_from_the_environment(name, launched):
    _, main_args = launcher_and_main_args(launched["argv"])
    flags = flag_values(main_args)
    paths = launched["paths"]
    assert flags["--data_path"] == [paths["DATA_PATH"]]
    if name.startswith("step3"):
        assert flags["--actor_model_name_or_path"] == [paths["ACTOR_MODEL_PATH"]]
        assert flags["--reward_model_name_or_path"] == [paths["REWARD_MODEL_PATH"]]
    else:
        assert flags["--model_name_or_path"] == [paths["MODEL_PATH"]]
    assert flags["--data_output_path"] == [SCRIPTS[name]["values"]["--data_output_path"]]


def test_runs_in_its_stage_dir_offline_and_logs(name, launched):
    record, caller = launched["record"], launched["caller"]
    assert Path(record.joinpath("cwd").read_text().strip()) == stage_dir(name)
    env = dict(line.split("=", 1) for line in record.joinpath("env").read_text().splitlines()
               if "=" in line)
    assert env.get("HF_DATASETS_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
    _, main_args = launcher_and_main_args(launched["argv"])
    # a relative output dir is the caller's, not the stage dir's
    assert flag_values(main_args)["--output_dir"] == [str(caller / "out")]
    assert "stub deepspeed ran" in (caller / "out" / "training.log").read_text()


def test_data_output_path_override(name, tmp_path):
    data = tmp_path / "Dahoas" / "rm-static"
    data.mkdir(parents=True)
    proc, argv, _ = run_script(ROOT / SCRIPTS[name]["path"], tmp_path, [str(tmp_path / "out")],
                               {"DATA_OUTPUT_PATH": str(tmp_path / "cache"),
                                "DATA_PATH": "Dahoas/rm-static"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    flags = flag_values(launcher_and_main_args(argv)[1])
    assert flags["--data_output_path"] == [str(tmp_path / "cache")]
    # an existing relative path is resolved from the caller's directory, before the cd
    assert flags["--data_path"] == [f"{tmp_path}/Dahoas/rm-static"]


def test_default_output_dir_and_paths(name, tmp_path):
    """No argument, no environment: the original's directory naming, known-dataset data path and no
    author's home directory. Run from a copy of the stage layout so the repository stays clean."""
    spec = SCRIPTS[name]
    copy = tmp_path / spec["path"]
    copy.parent.mkdir(parents=True)
    shutil.copy(ROOT / spec["path"], copy)
    proc, argv, record = run_script(copy, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    flags = flag_values(launcher_and_main_args(argv)[1])
    copied_stage = tmp_path / spec["path"].split("/")[0]
    assert Path(record.joinpath("cwd").read_text().strip()) == copied_stage
    output = flags["--output_dir"][0]
    pattern = spec["default_dir"].format(ts=r"\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d")
    assert re.fullmatch(r"\./log/" + pattern, output), output
    assert (copied_stage / output / "training.log").exists()
    # The original step-3 OPT script's data path named no known dataset
    assert flags["--data_path"][0].endswith("/Dahoas/rm-static")
    for flag in ("--model_name_or_path", "--actor_model_name_or_path", "--reward_model_name_or_path",
                 "--data_path"):
        if flag in flags:
            assert "/home/" not in flags[flag][0]


def test_failure_of_the_launcher_fails_the_script(name, tmp_path):
    proc, argv, _ = run_script(ROOT / SCRIPTS[name]["path"], tmp_path, [str(tmp_path / "out")],
                               {"STUB_EXIT": "3"})
    assert argv is not None
    assert proc.returncode != 0, "a failing deepspeed run must not look like success (tee)"


def test_flags_are_accepted_by_the_stage(name, launched):
    """parse_args of the stage's own main.py accepts the script's command line, with its values."""
    module = load_stage_main(stage_dir(name))
    _, main_args = launcher_and_main_args(launched["argv"])
    args = module.parse_args(main_args)
    spec = SCRIPTS[name]
    for flag, expected in spec["values"].items():
        assert same(getattr(args, flag[2:]), expected), f"{flag}: parsed {getattr(args, flag[2:])}"
    for flag in spec["on"]:
        assert getattr(args, flag[2:]) is True, flag
    for attr, expected in spec.get("parsed", {}).items():
        assert same(getattr(args, attr), expected), attr
    for flag in spec["off"]:
        value = getattr(args, flag[2:], None)
        assert value is not True, f"{flag} is on although the script does not pass it"
