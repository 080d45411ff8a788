"""Stage 1 on the tiny OPT, stopped or killed and resumed, against an uninterrupted run with the
same flags: on the CPU both are deterministic, so every metric record (train loss and LR of each
step, each evaluation) and the exported weights must be bit-identical. That also pins the data
order: a replayed or skipped batch would change the loss of its step and everything after.

    1 rank, ZeRO 2:  stop at the epoch boundary (step 9), resume.
    2 ranks, ZeRO 3: SIGTERM to rank 1 alone while step 2 saves -> both ranks stop at step 3;
                     resume (mid-epoch); SIGKILL everything in the middle of the step-8 save;
                     resume (from step 6, mid-epoch); SIGKILL at a random step; resume to the end.
    2 ranks -> 1 rank (ZeRO 2) through DeepSpeed's universal checkpoint: the loss continues.
"""
import math
import os
import random
import signal

import pytest

from stage_runner import BackgroundStage, assert_same_training, run_stage, sft_args
from utils.checkpoint import PAUSE_IN_SAVE_ENV, scan_checkpoints
from utils.training import read_metrics

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH_1_RANK = 9     # 72 training rows, 8 per step
TWO_RANK_EPOCHS = 3            # 36 rows per rank, 8 per step: 5 steps per epoch, 15 in all


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from utils.data.synthetic import build_dataset
    return build_dataset(str(tmp_path_factory.mktemp("resume_data")), num_train=120, num_test=40)


def args_for(model, data, out, zero_stage, extra=()):
    return sft_args(model, data, out, zero_stage, extra=list(extra))


def train_records(out):
    return {r["step"]: r for r in read_metrics(out) if "Train/loss" in r}


def assert_nothing_half_written(out):
    leftovers = [os.path.join(root, n) for root, dirs, files in os.walk(out)
                 for n in dirs + files if n.startswith((".tmp-", ".trash-")) or n.endswith(".tmp")]
    assert leftovers == []
    scan = scan_checkpoints(out)
    assert scan.ignored == [] and scan.newest is not None
    assert os.path.exists(os.path.join(out, "run_complete.json"))


@pytest.fixture(scope="module")
def one_rank_reference(tiny_opt_path, small_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference_1rank"))
    run_stage(1, args_for(tiny_opt_path, small_data, out, 2), num_gpus=1)
    return out


@pytest.fixture(scope="module")
def two_rank_reference(tiny_opt_path, small_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference_2ranks"))
    run_stage(1, args_for(tiny_opt_path, small_data, out, 3,
                          ["--num_train_epochs", TWO_RANK_EPOCHS]), num_gpus=2)
    return out


def test_one_rank_zero2_stop_at_epoch_boundary(one_rank_reference, tiny_opt_path, small_data,
                                               tmp_path):
    """The checkpoint of an epoch's last step comes after the end-of-epoch evaluation; the
    resumed run starts the next epoch with its own (seed, epoch) order."""
    out = str(tmp_path / "out")
    flags = args_for(tiny_opt_path, small_data, out, 2)
    log = run_stage(1, flags + ["--stop_after_steps", STEPS_PER_EPOCH_1_RANK], num_gpus=1)
    assert f"stopped at step {STEPS_PER_EPOCH_1_RANK}" in log
    assert not os.path.exists(os.path.join(out, "run_complete.json"))
    log = run_stage(1, flags + ["--resume"], num_gpus=1)
    assert f"continuing from {out}/checkpoints/step_{STEPS_PER_EPOCH_1_RANK}" in log
    assert_same_training(one_rank_reference, out)
    assert sorted(train_records(out)) == list(range(1, 2 * STEPS_PER_EPOCH_1_RANK + 1))


def test_two_ranks_zero3_sigterm_kill_in_save_and_random_kill(two_rank_reference, tiny_opt_path,
                                                              small_data, tmp_path):
    out = str(tmp_path / "out")
    flags = args_for(tiny_opt_path, small_data, out, 3,
                     ["--num_train_epochs", TWO_RANK_EPOCHS, "--save_steps", 2])
    root = os.path.join(out, "checkpoints")

    def paused(step):
        return lambda: os.path.exists(os.path.join(root, f".tmp-step_{step}", "PAUSED"))

    # SIGTERM to rank 1 only, while both ranks are inside the step-2 save: the flag is shared at
    # the next step boundary, both ranks save step 3 and exit cleanly.
    run = BackgroundStage(1, flags, 2, str(tmp_path / "sigterm.log"), {PAUSE_IN_SAVE_ENV: "2"})
    run.wait_until(paused(2), what="the step-2 save")
    os.kill(run.rank_pid(1), signal.SIGTERM)
    os.remove(os.path.join(root, ".tmp-step_2", "PAUSED"))
    assert run.wait() == 0, run.output()[-4000:]
    assert "stopped at step 3 (SIGTERM)" in run.output()
    assert scan_checkpoints(out).newest.step == 3

    # SIGKILL the launcher and both ranks in the middle of the step-8 save (engines written,
    # `complete.json` not): resume must pick step 6.
    run = BackgroundStage(1, flags + ["--resume"], 2, str(tmp_path / "kill_in_save.log"),
                          {PAUSE_IN_SAVE_ENV: "8"})
    run.wait_until(paused(8), what="the step-8 save")
    run.kill()
    scan = scan_checkpoints(out)
    assert scan.newest.step == 6 and [os.path.basename(p) for p, _ in scan.ignored] == [
        ".tmp-step_8"]

    # SIGKILL at a random step of the resumed run, then resume to the end.
    kill_at = random.Random(os.getpid()).randint(9, 12)  # the killed run logged up to 8
    run = BackgroundStage(1, flags + ["--resume"], 2, str(tmp_path / "random_kill.log"))
    run.wait_until(lambda: os.path.exists(os.path.join(out, "metrics.jsonl"))
                   and max(train_records(out), default=0) >= kill_at, what=f"step {kill_at}")
    run.kill()
    assert "ignoring" in run.output() and ".tmp-step_8" in run.output()
    log = run_stage(1, flags + ["--resume"], num_gpus=2)
    print(f"killed at step {kill_at}; resumed from", log.split("continuing from ")[1][:80])
    assert_same_training(two_rank_reference, out)
    assert_nothing_half_written(out)


def test_two_ranks_to_one_rank_through_the_universal_checkpoint(one_rank_reference,
                                                                tiny_opt_path, small_data,
                                                                tmp_path):
    """2 ranks x 4 rows, then 1 rank x 8: the same 8 rows per step in the same order, so the
    resumed run follows the 1-rank reference closely (not bit for bit: the loss is averaged per
    rank, and the reductions differ) and its LR schedule exactly."""
    out = str(tmp_path / "out")
    stop = 6
    run_stage(1, args_for(tiny_opt_path, small_data, out, 2,
                          ["--per_device_train_batch_size", 4, "--stop_after_steps", stop]),
              num_gpus=2)
    log = run_stage(1, args_for(tiny_opt_path, small_data, out, 2, ["--resume", "--universal"]),
                    num_gpus=1)
    assert "universal" in log
    reference, resumed = train_records(one_rank_reference), train_records(out)
    assert sorted(resumed) == list(range(1, 2 * STEPS_PER_EPOCH_1_RANK + 1))
    # a fresh start (loss near the first step's) would be far outside the 2% below
    assert reference[1]["Train/loss"] > 1.1 * reference[stop + 1]["Train/loss"]
    for step in range(stop + 1, stop + 4):
        want, got = reference[step], resumed[step]
        assert got["Train/lr"] == pytest.approx(want["Train/lr"], rel=1e-12)
        assert got["Train/loss"] == pytest.approx(want["Train/loss"], rel=0.02), step
    final = [r["Test/ppl"] for r in read_metrics(out) if "Test/ppl" in r][-1]
    want = [r["Test/ppl"] for r in read_metrics(one_rank_reference) if "Test/ppl" in r][-1]
    assert math.isfinite(final) and final == pytest.approx(want, rel=0.05)
