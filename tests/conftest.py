"""Shared fixtures: offline mode, the CPU accelerator, and tiny model checkpoints built locally."""
import os

# Nothing in the tests may reach the network; DeepSpeed runs on the CPU accelerator.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_opt_path(tmp_path_factory):
    """A tiny OPT-family checkpoint directory (config, random weights, byte-level BPE tokenizer)."""
    from utils.model.tiny_models import build_tiny_checkpoint
    return build_tiny_checkpoint("opt", str(tmp_path_factory.mktemp("tiny") / "tiny-opt"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A tiny Llama-family checkpoint directory (config, random weights, SentencePiece tokenizer)."""
    from utils.model.tiny_models import build_tiny_checkpoint
    return build_tiny_checkpoint("llama", str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))
