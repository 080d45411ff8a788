"""Stage 3 (ReMax) end to end through the deepspeed launcher on the CPU, on the tiny models of
stages 1 and 2: a few updates with finite metrics, and an actor that reloads with plain
transformers."""
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage_runner import remax_args, run_stage
from utils.training import read_metrics

pytestmark = pytest.mark.slow

STEP_KEYS = ("train/reward", "train/baseline_reward", "train/kl", "train/entropy",
             "train/actor_loss", "train/e2e_seconds")


def check_remax_run(out, log, updates=4):
    records = read_metrics(out)
    steps = [r for r in records if "train/reward" in r]
    evals = [r for r in records if "eval/reward" in r]
    assert len(steps) == updates
    for record in steps:
        for key in STEP_KEYS:
            assert math.isfinite(record[key]), (key, record)
    assert len(evals) >= 2 and all(math.isfinite(e["eval/kl"]) for e in evals)
    assert "baseline (greedy) reward" in log and "End-to-End => Latency" in log
    actor = os.path.join(out, "actor")
    model = AutoModelForCausalLM.from_pretrained(actor).eval()
    tok = AutoTokenizer.from_pretrained(actor)
    ids = tok("\n\nHuman: Tell me about the moon?\n\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    return steps


def test_remax_opt_one_rank_actor_zero2(sft_opt, reward_opt, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 0, 0, 1,
                                  extra=["--save_answers", "--enable_hybrid_engine"]))
    steps = check_remax_run(out, log)
    # The actor moved away from the reference: KL grows from exactly 0 at the first update.
    assert steps[0]["train/kl"] < 1e-6 < steps[-1]["train/kl"]
    with open(os.path.join(out, "evaluation", "rank_0.json")) as f:
        answers = json.load(f)
    assert answers and {"prompt", "answer", "reward", "greedy_answer"} <= set(answers[0])


def test_remax_llama_two_ranks_all_zero3(tiny_llama_path, reward_llama, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(tiny_llama_path, reward_llama, preference_data, out, 3, 3, 3, 0),
                    num_gpus=2)
    check_remax_run(out, log)


def test_remax_opt_lora_only(sft_opt, reward_opt, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 0, 0, 1,
                                  extra=["--actor_lora_dim", 4, "--only_optimize_lora",
                                         "--actor_lora_learning_rate", 1e-3]))
    check_remax_run(out, log)
    # The saved actor has LoRA merged: plain HF keys only, and it differs from the SFT model.
    saved = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor"))
    sft = AutoModelForCausalLM.from_pretrained(sft_opt)
    assert not any("lora" in k for k in saved.state_dict())
    diffs = [(a - b).abs().max().item() for (n, a), (_, b) in
             zip(saved.state_dict().items(), sft.state_dict().items()) if "q_proj.weight" in n]
    assert max(diffs) > 0


def test_remax_opt_with_ema_and_pretraining_mix(sft_opt, reward_opt, preference_data, tmp_path):
    """The two features the original stopped at with NotImplementedError; the EMA copy runs at
    ZeRO 3 (the reference's stage), where an update made inside a plain gather would be lost."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The {w} river is clear and kind, a useful story of the city."
                                for w in ("moon", "sun", "tree", "frog") * 50))
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 3, 0, 1,
                                  extra=["--enable_ema", "--unsupervised_dataset_name", corpus,
                                         "--unsupervised_dataset_config_name", "plain_text",
                                         "--unsup_coef", 0.5, "--max_answer_seq_len", 8]))
    steps = check_remax_run(out, log)
    assert all(math.isfinite(s["train/unsup_loss"]) and s["train/unsup_loss"] > 0 for s in steps)
    actor = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor")).state_dict()
    ema = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor_ema")).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(sft_opt).state_dict()
    name = "model.decoder.layers.0.fc1.weight"
    # The EMA moved from the SFT weights towards the actor, but by far less than the actor moved.
    ema_shift = (ema[name] - sft[name]).abs().max().item()
    actor_shift = (actor[name] - sft[name]).abs().max().item()
    assert 0 < ema_shift < actor_shift
