"""Stage 3 stopped after 2 of 4 updates and resumed, against an uninterrupted run with the same
flags: on the CPU both are deterministic, so every metric record (except wall times) and the saved
actor (and PPO's critic) must be bit-identical. The sampled answers depend on the restored RNG and
the prompts on the data position, so a replayed batch or a lost RNG state changes everything after.

    ReMax, 1 rank, ZeRO 2, 2 samples per prompt.
    PPO, 2 ranks, actor and critic ZeRO 3 (the critic's optimizer states), and the guard that
    refuses to run into a finished directory.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from stage_runner import remax_args, run_stage
from utils.training import read_metrics

pytestmark = pytest.mark.slow

# Measurements of the machine, not of the training: times and peak memory.
MEASURED = ("seconds", "tokens_per_second", "_mib")


def comparable(records):
    return [{k: v for k, v in r.items() if not any(t in k for t in MEASURED)} for r in records]


def weights(directory):
    names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    assert names, directory
    return {name: load_file(os.path.join(directory, name)) for name in names}


def assert_same_run(reference, resumed, models):
    expected, got = comparable(read_metrics(reference)), comparable(read_metrics(resumed))
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert a == b, f"record {i} differs:\n uninterrupted {a}\n resumed       {b}"
    for model in models:
        want, have = weights(os.path.join(reference, model)), weights(os.path.join(resumed, model))
        for name in want:
            different = [k for k in want[name] if not torch.equal(want[name][k], have[name][k])]
            assert not different, f"{model}/{name}: {different[:3]}"


def stop_and_resume(args, out, num_gpus):
    log = run_stage(3, args + ["--stop_after_steps", 2], num_gpus=num_gpus)
    assert "stopped at step 2" in log
    assert len([r for r in read_metrics(out) if "train/reward" in r]) == 2
    log = run_stage(3, args + ["--resume"], num_gpus=num_gpus)
    assert "[resume] continuing from" in log
    return log


def test_remax_one_rank_two_samples_resumes_exactly(sft_opt, reward_opt, preference_data,
                                                    tmp_path):
    extra = ["--num_samples_per_prompt", 2]
    reference = str(tmp_path / "reference")
    run_stage(3, remax_args(sft_opt, reward_opt, preference_data, reference, 2, 0, 0, 1, extra))
    resumed = str(tmp_path / "resumed")
    stop_and_resume(remax_args(sft_opt, reward_opt, preference_data, resumed, 2, 0, 0, 1, extra),
                    resumed, 1)
    assert_same_run(reference, resumed, ["actor"])


def test_ppo_two_ranks_zero3_resumes_exactly(sft_opt, reward_opt, preference_data, tmp_path):
    extra = ["--algo", "ppo", "--critic_zero_stage", 3, "--critic_learning_rate", 1e-4]
    reference = str(tmp_path / "reference")
    args = remax_args(sft_opt, reward_opt, preference_data, reference, 3, 3, 3, 1, extra)
    run_stage(3, args, num_gpus=2)
    resumed = str(tmp_path / "resumed")
    stop_and_resume(remax_args(sft_opt, reward_opt, preference_data, resumed, 3, 3, 3, 1, extra),
                    resumed, 2)
    assert_same_run(reference, resumed, ["actor", "critic"])
    # a finished run is not replaced silently
    with pytest.raises(AssertionError, match="holds a finished run"):
        run_stage(3, args, num_gpus=2)
