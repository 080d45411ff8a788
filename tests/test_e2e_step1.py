"""Stage 1 end to end through the deepspeed launcher on the CPU: the loss falls, the saved
directory reloads with plain transformers and generates."""
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage_runner import run_stage, sft_args
from utils.checkpoint import scan_checkpoints
from utils.training import read_metrics

pytestmark = pytest.mark.slow


def check_run(out):
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
    # the end of a run: a resumable checkpoint of the last step, then the finished-run marker
    assert scan_checkpoints(out).newest.step == records[-1]["step"]
    assert os.path.exists(os.path.join(out, "run_complete.json"))


def test_sft_opt_one_rank_zero2(sft_opt):
    check_run(sft_opt)


def test_finished_output_dir_is_refused(sft_opt, tiny_opt_path, preference_data):
    """A second run into a finished run's directory stops before building anything."""
    with pytest.raises(AssertionError, match="holds a finished run: pass --resume to continue it"):
        run_stage(1, sft_args(tiny_opt_path, preference_data, sft_opt, zero_stage=2),
                  launcher=False)
    check_run(sft_opt)  # untouched


def test_sft_llama_two_ranks_zero3(tiny_llama_path, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(1, sft_args(tiny_llama_path, preference_data, out, zero_stage=3,
                                extra=["--gradient_checkpointing"]), num_gpus=2)
    assert "ppl:" in log
    check_run(out)


def test_sft_without_launcher_with_offload(tiny_opt_path, preference_data, tmp_path):
    """`python main.py` runs as world size 1 (the original crashed); ZeRO 2 + CPU optimizer offload
    (DeepSpeedCPUAdam)."""
    out = str(tmp_path / "out")
    log = run_stage(1, sft_args(tiny_opt_path, preference_data, out, zero_stage=2,
                                extra=["--offload", "--lora_dim", 4, "--lora_module_name",
                                       "decoder.layers."]), launcher=False)
    assert "[optimizer] DeepSpeedCPUAdam" in log
    check_run(out)
