"""A non-finite loss skips its update on every rank together (counted, logged); too many in a row
stop the run after a checkpoint, with one line; the run resumes from that checkpoint.

Unit tests drive NonFiniteUpdates with a stand-in engine that has DeepSpeed's step semantics;
the end-to-end tests make one rank's loss NaN (the hidden --debug_nan_loss UPDATE@RANK) and check
through the launcher that the weights after the skipped updates equal those before them.
"""
import os
from types import SimpleNamespace

import pytest
import torch

from stage_runner import remax_args, run_command, run_stage, sft_args, stage_command
from utils.errors import UserError
from utils.nonfinite import APPLIED, OVERFLOW, SKIPPED, STOP, NonFiniteUpdates, parse_debug_nan_loss
from utils.training import read_metrics


class PlainOptimizer:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


class StandInEngine:
    """DeepSpeed's contract: step() steps the optimizer every `gas` micro-steps; a wrapped
    optimizer (`checks`) skips a step with non-finite gradients and sets `.overflow`; a plain torch
    one applies whatever it gets, and the engine reads `.overflow` only where the optimizer has it."""

    def __init__(self, gas=1, checks=True):
        self.gas, self.micro_steps = gas, 0
        self.module = torch.nn.Linear(2, 1)
        self.optimizer = SimpleNamespace(overflow=False) if checks else PlainOptimizer()
        self._applied = False
        self.applied = 0

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.gas == 0

    def backward(self, loss):
        loss.backward()

    def step(self):
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            self._applied = False
            return
        if isinstance(self.optimizer, PlainOptimizer):
            self.optimizer.step()
        else:
            self.optimizer.overflow = any(not torch.isfinite(p.grad).all() for p in self.module.parameters())
        self._applied = not getattr(self.optimizer, "overflow", False)
        self.applied += self._applied
        self.module.zero_grad(set_to_none=True)

    def was_step_applied(self):
        return self._applied


def loss_of(engine, value=1.0):
    return engine.module(torch.full((1, 2), value)).sum()


def run_updates(guard, engine, losses_per_update):
    outcomes = []
    for update, losses in enumerate(losses_per_update):
        guard.begin_update(update)
        for value in losses:
            loss = loss_of(engine) * value
            guard.backward_and_step(engine, loss)
        outcomes.append(guard.end_update())
    return outcomes


def test_a_nan_in_the_window_skips_the_whole_step_and_a_finite_update_resets_the_streak():
    engine, guard = StandInEngine(gas=2), NonFiniteUpdates(patience=3)
    nan = float("nan")
    outcomes = run_updates(guard, engine, [[1, 1], [1, nan], [nan, 1], [1, 1], [float("inf"), 1]])
    assert outcomes == [APPLIED, SKIPPED, SKIPPED, APPLIED, SKIPPED]
    assert engine.applied == 2
    assert guard.counters() == {"nonfinite_streak": 1, "nonfinite_skipped": 3, "overflow_skipped": 0}


def test_the_streak_stops_the_run_with_one_line_naming_the_checkpoint():
    engine, guard = StandInEngine(), NonFiniteUpdates(patience=2, streak=1, skipped=4)
    assert run_updates(guard, engine, [[float("nan")]]) == [STOP]
    error = guard.stop_error("checkpoint /out/checkpoints/step_7")
    assert isinstance(error, UserError) and "\n" not in str(error)
    assert "2 updates in a row" in str(error) and "/out/checkpoints/step_7" in str(error)
    assert guard.counters()["nonfinite_skipped"] == 5
    assert guard.counters(stopping=True)["nonfinite_streak"] == 0    # the resume starts a new streak


def test_a_plain_optimizer_does_not_step_in_a_poisoned_window():
    """ZeRO stage 0 in fp32: torch's optimizer checks nothing, so the guard skips its step."""
    engine, guard = StandInEngine(gas=2, checks=False), NonFiniteUpdates()
    step = engine.optimizer.step
    assert run_updates(guard, engine, [[1, 1], [float("nan"), 1], [1, 1]]) == [APPLIED, SKIPPED, APPLIED]
    assert engine.optimizer.steps == 2 and engine.applied == 2
    assert engine.optimizer.step == step and not hasattr(engine.optimizer, "overflow")   # restored


def test_a_skip_without_a_nan_is_an_fp16_overflow():
    engine, guard = StandInEngine(), NonFiniteUpdates()
    engine.was_step_applied = lambda: False
    assert run_updates(guard, engine, [[1.0]]) == [OVERFLOW]
    assert guard.counters() == {"nonfinite_streak": 0, "nonfinite_skipped": 0, "overflow_skipped": 1}


def test_a_poisoned_step_that_deepspeed_applies_is_an_error():
    engine, guard = StandInEngine(), NonFiniteUpdates()
    engine.was_step_applied = lambda: True
    with pytest.raises(RuntimeError, match="applied an optimizer step whose gradients are non-finite"):
        run_updates(guard, engine, [[float("nan")]])


def test_debug_nan_loss_poisons_the_named_update_and_rank_only():
    assert parse_debug_nan_loss("3@1, 4") == {(3, 1), (4, 0)}
    with pytest.raises(UserError, match="--debug_nan_loss"):
        parse_debug_nan_loss("x@1")
    engine, guard = StandInEngine(), NonFiniteUpdates(debug_nan_loss="1@0,2@1")   # this is rank 0
    assert run_updates(guard, engine, [[1], [1], [1]]) == [APPLIED, SKIPPED, APPLIED]


# ------------------------------------------------------------------------------- through the launcher

def checkpoint_weights(out, step, name="model"):
    """fp32 weights of `<out>/checkpoints/step_<step>/<name>` (any ZeRO stage)."""
    directory = os.path.join(out, "checkpoints", f"step_{step}", name)
    tag = f"step_{step}"
    if any(f.startswith("zero_pp_rank_") or f.startswith("bf16_zero_pp_rank_")
           for f in os.listdir(os.path.join(directory, tag))):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(directory, tag)
    return torch.load(os.path.join(directory, tag, "mp_rank_00_model_states.pt"),
                      map_location="cpu", weights_only=False)["module"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    assert not different, different[:3]


def assert_different_weights(a, b):
    assert any(not torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from utils.data.synthetic import build_dataset
    return build_dataset(str(tmp_path_factory.mktemp("nonfinite_data")), num_train=120, num_test=40)


@pytest.mark.slow
def test_stage1_two_ranks_zero2_stops_after_a_streak_with_a_checkpoint_and_resumes(
        tiny_opt_path, small_data, tmp_path):
    out = str(tmp_path / "out")
    flags = sft_args(tiny_opt_path, small_data, out, 2, extra=["--num_train_epochs", 1, "--save_steps", 1])
    returncode, output = run_command(stage_command(1, flags + ["--max_nonfinite_updates", 2,
                                                               "--debug_nan_loss", "2@1,3@1"], 2))
    assert returncode != 0 and "Traceback" not in output, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite for 2 updates in a row" in errors[0], output[-3000:]
    assert f"{out}/checkpoints/step_3" in errors[0]
    warnings = [line for line in output.splitlines() if "non-finite model loss on 1 rank(s)" in line]
    assert len(warnings) == 2, output[-3000:]
    # steps 2 and 3 applied nothing on either rank
    assert_same_weights(checkpoint_weights(out, 1), checkpoint_weights(out, 3))
    log = run_stage(1, flags + ["--resume"], num_gpus=2)
    assert f"continuing from {out}/checkpoints/step_3" in log
    assert os.path.exists(os.path.join(out, "run_complete.json"))
    assert_different_weights(checkpoint_weights(out, 3), checkpoint_weights(out, 4))
    skips = [r for r in read_metrics(out) if "Train/nonfinite_skipped" in r]
    assert [(r["step"], r["Train/nonfinite_skipped"]) for r in skips] == [(2, 1), (3, 2)]


@pytest.mark.slow
def test_stage1_zero0_one_skip_leaves_the_weights_and_the_run_goes_on(tiny_opt_path, small_data, tmp_path):
    out = str(tmp_path / "out")
    flags = sft_args(tiny_opt_path, small_data, out, 0,
                     extra=["--num_train_epochs", 1, "--save_steps", 1, "--debug_nan_loss", "2@0"])
    log = run_stage(1, flags, num_gpus=1)
    assert log.count("non-finite model loss on 1 rank(s)") == 1
    assert_same_weights(checkpoint_weights(out, 1), checkpoint_weights(out, 2))
    assert_different_weights(checkpoint_weights(out, 2), checkpoint_weights(out, 3))


@pytest.mark.slow
def test_stage3_two_ranks_zero3_skips_the_update_on_both_ranks(sft_opt, reward_opt, preference_data, tmp_path):
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 3, 3, 3, 1,
                                  extra=["--save_steps", 1, "--debug_nan_loss", "1@1"]), num_gpus=2)
    assert log.count("non-finite actor loss on 1 rank(s)") == 1
    assert_same_weights(checkpoint_weights(out, 1, "actor"), checkpoint_weights(out, 2, "actor"))
    assert_different_weights(checkpoint_weights(out, 2, "actor"), checkpoint_weights(out, 3, "actor"))
    records = read_metrics(out)
    assert [r["train/nonfinite_skipped"] for r in records if "train/nonfinite_skipped" in r] == [1]
    # --test_stop_step 4 counts applied updates: the skipped one is made up for
    assert len([r for r in records if "train/reward" in r]) == 5


@pytest.mark.slow
def test_stage3_non_finite_logits_while_sampling_skip_the_update_on_both_ranks(
        sft_opt, reward_opt, preference_data, tmp_path):
    """An +inf logit in rank 1's rollout of update 1 (the hidden --debug_nan_logits): the row is
    ended with EOS instead of reaching torch.multinomial (a device-side assert on CUDA), and the
    update is skipped on every rank through the non-finite path."""
    out = str(tmp_path / "out")
    log = run_stage(3, remax_args(sft_opt, reward_opt, preference_data, out, 3, 3, 3, 1,
                                  extra=["--save_steps", 1, "--debug_nan_logits", "1@1"]), num_gpus=2)
    assert log.count("update 1, rank 1: non-finite logits in 1 decoding step(s)") == 1
    assert log.count("non-finite actor loss on 1 rank(s)") == 1
    assert_same_weights(checkpoint_weights(out, 1, "actor"), checkpoint_weights(out, 2, "actor"))
    assert_different_weights(checkpoint_weights(out, 2, "actor"), checkpoint_weights(out, 3, "actor"))
    records = read_metrics(out)
    assert [r["train/nonfinite_skipped"] for r in records if "train/nonfinite_skipped" in r] == [1]
    rows = [r["train/nonfinite_logit_rows"] for r in records if "train/nonfinite_logit_rows" in r]
    assert rows[1] == 0.5 and sum(rows) == 0.5     # mean over 2 ranks of 1 and 0
    # "does it fit": the fullest rank's whole-run peak, never below the ranks' mean peak
    steps = [r for r in records if "train/reward" in r]
    assert all(r["train/max_rank_reserved_peak_mib"] >= r["train/process_peak_mib"] > 0
               for r in steps)
