"""Shared fixtures: offline mode, the CPU accelerator, and tiny model checkpoints built locally."""
import os
import sys

# Nothing in the tests may reach the network (but the `network`-marked GPU-install resolution of
# tests/test_gpu_install.py, which reads PyPI metadata); DeepSpeed runs on the CPU accelerator.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's JIT-built CPU ops go inside this environment (each clone builds its own), not into the
# user's ~/.cache/torch_extensions where another checkout's killed build can leave a lock behind.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest

CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def pytest_sessionstart(session):
    """Build the CPU ops once, here, so no timed test compiles and none is killed mid-build (a killed
    build leaves a lock that hangs every later run). A lock left by an earlier session is removed."""
    if os.environ["DS_ACCELERATOR"] != "cpu":
        return
    from utils.torch_extensions import stale_build_locks

    for lock in stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"]):
        print(f"removing the stale build lock {lock}")
        os.remove(lock)
    from deepspeed.accelerator import get_accelerator

    for name in CPU_OPS:
        get_accelerator().create_op_builder(name).load(verbose=False)


@pytest.fixture(scope="session")
def tiny_opt_path(tmp_path_factory):
    """A tiny OPT-family checkpoint directory (config, random weights, byte-level BPE tokenizer)."""
    from utils.model.tiny_models import build_tiny_checkpoint
    return build_tiny_checkpoint("opt", str(tmp_path_factory.mktemp("tiny") / "tiny-opt"))


@pytest.fixture(scope="session")
def odd_vocab_opt_path(tiny_opt_path, tmp_path_factory):
    """The tiny OPT with one added token and vocab_size = len(tokenizer) = 513, so the stages grow the
    embedding to 8·⌈513/8⌉ = 520 rows (as with GPT-2's 50257)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = str(tmp_path_factory.mktemp("odd") / "opt-513")
    tokenizer = AutoTokenizer.from_pretrained(tiny_opt_path)
    tokenizer.add_tokens(["<extra_token>"])
    config = AutoConfig.from_pretrained(tiny_opt_path)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A tiny Llama-family checkpoint directory (config, random weights, SentencePiece tokenizer)."""
    from utils.model.tiny_models import build_tiny_checkpoint
    return build_tiny_checkpoint("llama", str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory):
    """The synthetic preference set (helpful-word rule) in the hub layout of Dahoas/rm-static."""
    from utils.data.synthetic import build_dataset
    return build_dataset(str(tmp_path_factory.mktemp("data")), num_train=600, num_test=200)


@pytest.fixture(scope="session")
def sft_opt(tiny_opt_path, preference_data, tmp_path_factory):
    """Stage 1 on the tiny OPT (1 rank, ZeRO 2): the output directory."""
    from stage_runner import run_stage, sft_args
    out = str(tmp_path_factory.mktemp("sft_opt"))
    run_stage(1, sft_args(tiny_opt_path, preference_data, out, zero_stage=2), num_gpus=1)
    return out


@pytest.fixture(scope="session")
def reward_opt(sft_opt, preference_data, tmp_path_factory):
    """Stage 2 on the stage-1 OPT (1 rank, ZeRO 2): the output directory."""
    from stage_runner import reward_args, run_stage
    out = str(tmp_path_factory.mktemp("reward_opt"))
    run_stage(2, reward_args(sft_opt, preference_data, out, zero_stage=2, pad_at_beginning=1),
              num_gpus=1)
    return out


@pytest.fixture(scope="session")
def reward_llama(tiny_llama_path, preference_data, tmp_path_factory):
    """Stage 2 on the tiny Llama (2 ranks, ZeRO 3): the output directory."""
    from stage_runner import reward_args, run_stage
    out = str(tmp_path_factory.mktemp("reward_llama"))
    run_stage(2, reward_args(tiny_llama_path, preference_data, out, zero_stage=3,
                             pad_at_beginning=0), num_gpus=2)
    return out
