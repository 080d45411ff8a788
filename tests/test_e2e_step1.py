"""Stage 1 end to end through the deepspeed launcher on the CPU: the loss falls, the saved
directory reloads with plain transformers and generates."""
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage_runner import run_stage
from utils.data.synthetic import build_dataset
from utils.training import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    return build_dataset(str(tmp_path_factory.mktemp("data")), num_train=600, num_test=200)


def sft_args(model_path, data_path, out, cache, zero_stage, extra=()):
    return ["--model_name_or_path", model_path, "--data_path", data_path, "--data_split", "6,2,2",
            "--data_output_path", cache, "--output_dir", out, "--max_seq_len", 64,
            "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16,
            "--learning_rate", 3e-3, "--num_train_epochs", 2, "--num_warmup_steps", 2,
            "--zero_stage", zero_stage, "--evals_per_epoch", 2, "--deepspeed", *extra]


def check_run(out, tokenizer_path):
    records = read_metrics(out)
    evals = [r["Test/ppl"] for r in records if "Test/ppl" in r]
    losses = [r["Train/loss"] for r in records if "Train/loss" in r]
    assert len(evals) >= 3 and all(math.isfinite(p) for p in evals)
    assert evals[-1] < 0.5 * evals[0], f"perplexity did not fall: {evals}"
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("\n\nHuman: Tell me about the moon?\n\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert os.path.exists(os.path.join(out, "args.json"))


def test_sft_opt_one_rank_zero2(tiny_opt_path, preference_data, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    log = run_stage(1, sft_args(tiny_opt_path, preference_data, out, str(tmp_path / "cache"), 2),
                    num_gpus=1)
    assert "ppl:" in log
    check_run(out, tiny_opt_path)


def test_sft_llama_two_ranks_zero3(tiny_llama_path, preference_data, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    run_stage(1, sft_args(tiny_llama_path, preference_data, out, str(tmp_path / "cache"), 3),
              num_gpus=2)
    check_run(out, tiny_llama_path)
