"""Stage 2 end to end through the deepspeed launcher on the CPU: accuracy rises clearly above
chance, and the saved reward model reloads in a fresh process with the same scores."""
import pytest
import torch

from stage_runner import assert_same_training, reward_args, run_stage
from utils.data.data_utils import DataCollatorReward, create_prompt_dataset
from utils.model.model_utils import create_critic_model, load_hf_tokenizer
from utils.training import evaluate_reward, make_loader, read_metrics

pytestmark = pytest.mark.slow


def check_reward_run(out, data_path, tmp_path, pad_at_beginning):
    evals = [r for r in read_metrics(out) if "Test/acc" in r]
    assert evals[0]["Test/acc"] < 0.7, evals[0]
    assert evals[-1]["Test/acc"] >= 0.75, [e["Test/acc"] for e in evals]
    # Reload in this (fresh) process, without DeepSpeed, and score the same eval split.
    tokenizer = load_hf_tokenizer(out)
    model = create_critic_model(out, tokenizer, None, pad_at_beginning, rlhf_training=True).eval()
    _, eval_data = create_prompt_dataset(-1, [data_path], "2,6,2", str(tmp_path / "cache"), 2,
                                         1234, tokenizer, 64)
    loader = make_loader(eval_data, 15, DataCollatorReward(), shuffle=False, distributed=False)
    scores = evaluate_reward(model, loader, torch.device("cpu"))
    assert scores["acc"] == pytest.approx(evals[-1]["Test/acc"], abs=1e-6)
    assert scores["chosen_score"] == pytest.approx(evals[-1]["Test/reward_score"], abs=1e-5)
    assert scores["rejected_score"] == pytest.approx(evals[-1]["Test/rejected_score"], abs=1e-5)


def test_reward_opt_one_rank_zero2(reward_opt, preference_data, tmp_path):
    check_reward_run(reward_opt, preference_data, tmp_path, pad_at_beginning=1)


def test_reward_llama_two_ranks_zero3(reward_llama, preference_data, tmp_path):
    check_reward_run(reward_llama, preference_data, tmp_path, pad_at_beginning=0)


def test_reward_stopped_and_resumed_is_the_uninterrupted_run(sft_opt, reward_opt, preference_data,
                                                             tmp_path):
    """Stage 2 shares stage 1's resumable loop: stopped mid-epoch and resumed, every loss,
    accuracy and exported tensor equals the uninterrupted `reward_opt` run, bit for bit."""
    out = str(tmp_path / "out")
    flags = reward_args(sft_opt, preference_data, out, zero_stage=2, pad_at_beginning=1)
    assert "stopped at step 20" in run_stage(2, flags + ["--stop_after_steps", 20], num_gpus=1)
    run_stage(2, flags + ["--resume"], num_gpus=1)
    assert_same_training(reward_opt, out)
