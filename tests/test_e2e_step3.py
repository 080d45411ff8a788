"""Stage 3 end to end through the deepspeed launcher on the CPU, on the tiny models of stages 1 and
2: ReMax, PPO, RLOO and GRPO, a few updates each with finite metrics, and an actor (and PPO's critic)
that reloads without DeepSpeed."""
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
    """Also with the LM head in chunks of a few tokens: the ranks' answers differ in length, so
    they need different numbers of chunks and must still run as many head forwards."""
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(tiny_llama_path, reward_llama, preference_data, out, 3, 3, 3, 0,
                                  extra=["--logit_chunk_mib", 0.05]),
                    num_gpus=2)
    check_remax_run(out, log)


def test_remax_opt_lora_only(sft_opt, reward_opt, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 0, 0, 1,
                                  extra=["--actor_lora_dim", 4, "--only_optimize_lora",
                                         "--actor_lora_learning_rate", 1e-3,
                                         "--num_samples_per_prompt", 2]))
    check_remax_run(out, log)
    # two sampled answers per prompt share the greedy baseline: 4 prompts -> 8 rows per update
    assert "2 sampled answer(s) per prompt + greedy baseline" in log
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


def check_algorithm_run(out, log, algo, updates=4):
    records = read_metrics(out)
    steps = [r for r in records if "train/reward" in r]
    evals = [r for r in records if "eval/reward" in r]
    assert len(steps) == updates
    for record in steps:
        for key in ("train/reward", "train/kl", "train/actor_loss", "train/advantage",
                    "train/generation_seconds", "train/experience_seconds", "train/e2e_seconds"):
            assert math.isfinite(record[key]), (key, record)
        assert record["train/e2e_seconds"] >= record["train/generation_seconds"]
    # every algorithm's evaluation reports the greedy answer too
    assert len(evals) >= 2 and all(math.isfinite(e["eval/greedy_reward"]) for e in evals)
    assert f"Running training: {algo}" in log
    return steps


def test_ppo_opt_one_rank_zero2(sft_opt, reward_opt, preference_data, tmp_path):
    from algorithms import AlgorithmSettings, ESTIMATORS
    from trainer import answer_batch
    from utils.model.model_utils import create_critic_model, load_hf_tokenizer
    from utils.model.reward_model import read_reward_checkpoint

    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 0, 0, 1,
                                  extra=["--algo", "ppo", "--critic_zero_stage", 2,
                                         "--critic_learning_rate", 1e-3,
                                         "--disable_critic_dropout", "--dump_first_experience"]))
    steps = check_algorithm_run(out, log, "ppo")
    assert all(s["train/critic_loss"] > 0 for s in steps)
    # The logged batch's advantages are the pure GAE estimator's output on it (γ 0.99, λ 0.95).
    experiences = torch.load(os.path.join(out, "experience", "step_0_rank_0.pt"))
    settings = AlgorithmSettings(gamma=0.99, lam=0.95, kl_ctl=0.05, clip_reward_value=5.0)
    for exp in experiences:
        adv = ESTIMATORS["gae"](answer_batch(exp), settings)
        torch.testing.assert_close(exp["advantages"], adv.advantages)
        torch.testing.assert_close(exp["returns"], adv.returns)
    # The critic was trained and saved in the reward-model layout, which rw_eval.py reads.
    critic_dir = os.path.join(out, "critic")
    trained, _ = read_reward_checkpoint(critic_dir)
    start, _ = read_reward_checkpoint(reward_opt)
    assert trained.keys() == start.keys()
    assert max((trained[k].float() - start[k].float()).abs().max().item() for k in trained) > 0
    critic = create_critic_model(critic_dir, load_hf_tokenizer(critic_dir),
                                 num_padding_at_beginning=1, rlhf_training=True)
    assert critic.v_head.weight.abs().sum() > 0


def test_ppo_llama_two_ranks_all_zero3(tiny_llama_path, reward_llama, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(tiny_llama_path, reward_llama, preference_data, out, 3, 3, 3, 0,
                                  extra=["--algo", "ppo", "--critic_zero_stage", 3,
                                         "--critic_learning_rate", 1e-4, "--ppo_epochs", 2,
                                         "--critic_lora_module_name", "layers."]),
                    num_gpus=2)
    steps = check_algorithm_run(out, log, "ppo")
    assert all(math.isfinite(s["train/critic_loss"]) for s in steps)
    assert os.path.exists(os.path.join(out, "critic"))


def test_rloo_opt_two_ranks_zero2(sft_opt, reward_opt, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 0, 0, 1,
                                  extra=["--algo", "rloo", "--dump_first_experience"]),
                    num_gpus=2)
    steps = check_algorithm_run(out, log, "rloo")
    # RLOO's baseline is the other sample's reward: with k = 2 the two advantages of a prompt are
    # opposite, so they average to 0 over every update.
    assert all(abs(s["train/advantage"]) < 1e-5 for s in steps)
    micro_batches = torch.load(os.path.join(out, "experience", "step_0_rank_1.pt"))
    # 4 prompts x 2 samples, cut into micro-batches of the training batch size (4)
    assert [len(exp["input_ids"]) for exp in micro_batches] == [4, 4]
    assert all("baseline_rewards" not in exp for exp in micro_batches)


def test_grpo_llama_one_rank_zero3(tiny_llama_path, reward_llama, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(tiny_llama_path, reward_llama, preference_data, out, 3, 3, 3, 0,
                                  extra=["--algo", "grpo", "--num_samples_per_prompt", 3,
                                         "--ppo_epochs", 2, "--actor_learning_rate", 1e-4]))
    steps = check_algorithm_run(out, log, "grpo")
    # normalised within each group: the advantages of a prompt's samples sum to 0
    assert all(abs(s["train/advantage"]) < 1e-4 for s in steps)
    # at the second pass over the experience the ratio moves off 1, so GRPO's KL term is non-zero
    assert any(s["train/kl_loss"] > 0 for s in steps)


def test_remax_opt_bf16_one_rank_actor_zero2_frozen_zero3_with_ema(sft_opt, reward_opt,
                                                                   preference_data, tmp_path):
    """The half-precision recipe's path on the CPU (bf16 runs there under DeepSpeed): the LM heads
    compute float32 logits from bf16 weights, the metrics stay finite, the actor exports."""
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 2, 3, 3, 1,
                                  extra=["--actor_bf16", "--reward_bf16", "--enable_ema"]))
    check_remax_run(out, log)
    assert "[scoring] actor: LM head computes float32 logits from torch.bfloat16 weights" in log
    assert "[scoring] reference: LM head computes float32 logits from torch.bfloat16" in log
    # The EMA is kept (and exported) in float32, the actor in its bf16.
    from safetensors.torch import load_file

    actor = load_file(os.path.join(out, "actor", "model.safetensors"))
    ema = load_file(os.path.join(out, "actor_ema", "model.safetensors"))
    assert {t.dtype for t in actor.values()} == {torch.bfloat16}
    assert {t.dtype for t in ema.values()} == {torch.float32}
