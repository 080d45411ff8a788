"""utils/checkpoint.py without DeepSpeed engines or a process group: the atomic save and its
`latest` marker, discovery of the newest complete checkpoint, keep-K pruning, the RNG round trip,
the finished-run guard, and the loaders' (seed, epoch) order the exact resume relies on."""
import argparse
import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler
from torch.utils.data.distributed import DistributedSampler

from utils import checkpoint as ckpt
from utils.training import (EpochRandomSampler, MetricsLog, SupervisedState, make_loader,
                            set_loader_epoch, supervised_state)


class FakeEngine:
    """The part of a DeepSpeed engine the checkpoint code calls; its "state" is one number."""

    optimizer = "an optimizer"  # a trained engine: saved with its own save_checkpoint

    def __init__(self, value=0.0, fail_load=False):
        self.value = value
        self.fail_load = fail_load

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # DeepSpeed's own `latest` would bypass ours
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"value": self.value, **client_state},
                   os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        if self.fail_load or not os.path.exists(path):
            return None, None
        self.value = torch.load(path, weights_only=False)["value"]
        return path, {}


def run_args(out, **flags):
    values = dict(output_dir=str(out), save_steps=0, resume=False, resume_from=None,
                  keep_checkpoints=0, overwrite_output_dir=False, universal=False,
                  stop_after_steps=None)
    values.update(flags)
    return argparse.Namespace(**values)


def save(out, step, value=0.0, metric=None, keep=0):
    return ckpt.save_training_checkpoint(str(out), step, {"model": FakeEngine(value)},
                                         {"step": step}, metric, keep)


def ppl(value, step):
    return {"name": "Test/ppl", "value": value, "step": step, "higher_is_better": False}


def steps(scan):
    return [c.step for c in scan.valid]


def test_save_writes_a_complete_checkpoint_and_advances_latest(tmp_path):
    path = save(tmp_path, 4, value=1.5)
    assert path == str(tmp_path / "checkpoints" / "step_4")
    names = sorted(os.listdir(path))
    assert names == ["complete.json", "loop_state.json", "model", "rng_rank_0.pt"]
    meta = json.load(open(os.path.join(path, "complete.json")))
    assert meta["step"] == 4 and meta["world_size"] == 1
    assert meta["engines"] == {"model": {"tag": "step_4", "kind": "deepspeed", "zero_stage": 0,
                                         "optimizer_files": 0}}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_4"
    # nothing temporary is left: no .tmp- directory, no *.tmp file
    leftovers = [n for _, dirs, files in os.walk(tmp_path) for n in dirs + files
                 if n.startswith(".tmp-") or n.endswith(".tmp")]
    assert leftovers == []


def test_discovery_ignores_and_reports_what_latest_does_not_cover(tmp_path, capsys):
    for step in (2, 4, 6):
        save(tmp_path, step)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_8" / "model").mkdir(parents=True)          # a save killed half-way
    (root / "step_10" / "model").mkdir(parents=True)              # no complete.json
    save(tmp_path / "other", 12)                                  # complete, but newer than
    os.rename(tmp_path / "other" / "checkpoints" / "step_12", root / "step_12")  # `latest`
    scan = ckpt.scan_checkpoints(str(tmp_path))
    assert steps(scan) == [2, 4, 6] and scan.newest.step == 6 and scan.latest == "step_6"
    reasons = {os.path.basename(p): r for p, r in scan.ignored}
    assert set(reasons) == {".tmp-step_8", "step_10", "step_12"}
    assert "no complete.json" in reasons["step_10"] and "newer than" in reasons["step_12"]
    scan.report()
    assert capsys.readouterr().out.count("ignoring") == 3


def test_without_a_latest_marker_nothing_is_resumable(tmp_path):
    save(tmp_path, 2)
    os.remove(tmp_path / "checkpoints" / "latest")
    scan = ckpt.scan_checkpoints(str(tmp_path))
    assert scan.valid == [] and "no `latest` marker" in scan.ignored[0][1]
    with pytest.raises(ckpt.ResumeError, match="found no complete checkpoint"):
        ckpt.prepare_output_dir(run_args(tmp_path, resume=True))


def test_keep_k_never_deletes_the_best(tmp_path):
    for step, value in [(1, 5.0), (2, 2.0), (3, 4.0), (4, 3.0), (5, 6.0)]:
        save(tmp_path, step, metric=ppl(value, step), keep=2)
    assert steps(ckpt.scan_checkpoints(str(tmp_path))) == [2, 4, 5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_2", "step_4",
                                                            "step_5"]


def test_best_checkpoint_follows_the_metric_direction(tmp_path):
    acc = {"name": "Test/acc", "higher_is_better": True}
    for step, value in [(1, 0.6), (2, 0.8), (3, 0.8), (4, 0.7)]:
        save(tmp_path, step, metric={**acc, "value": value, "step": step})
    assert ckpt.best_checkpoint(ckpt.scan_checkpoints(str(tmp_path)).valid).step == 2


def test_rng_round_trip_through_the_saved_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
                torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            torch.nn.functional.dropout(torch.ones(8), 0.5).tolist()) == expected


def test_restore_rng_reads_this_ranks_file(tmp_path):
    torch.manual_seed(5)
    path = save(tmp_path, 3)
    expected = torch.rand(4)
    torch.manual_seed(6)
    plan = ckpt.ResumePlan(path, {}, {}, [], 1)
    assert ckpt.restore_rng(plan)
    assert torch.equal(torch.rand(4), expected)


def test_finished_run_is_refused_unless_resume_or_overwrite(tmp_path):
    (tmp_path / "data_cache").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert ckpt.prepare_output_dir(run_args(tmp_path)) is None   # a stale dir is fine
    save(tmp_path, 5)
    ckpt.mark_run_complete(str(tmp_path), {"step": 5})
    with pytest.raises(ckpt.ResumeError, match="holds a finished run: pass --resume"):
        ckpt.prepare_output_dir(run_args(tmp_path))
    plan = ckpt.prepare_output_dir(run_args(tmp_path, resume=True))
    assert plan.step == 5 and plan.loop_state == {"step": 5}
    assert not (tmp_path / "run_complete.json").exists()  # the run is going on again
    assert ckpt.prepare_output_dir(run_args(tmp_path, overwrite_output_dir=True)) is None
    assert sorted(os.listdir(tmp_path)) == ["data_cache"]


def test_unfinished_run_with_checkpoints_is_refused_without_resume(tmp_path):
    save(tmp_path, 2)
    with pytest.raises(ckpt.ResumeError, match=r"holds checkpoints \(newest .*step_2\)"):
        ckpt.prepare_output_dir(run_args(tmp_path))


def test_partial_state_of_an_interrupted_run_is_cleared_on_a_fresh_start(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_2" / "model").mkdir(parents=True)
    assert ckpt.prepare_output_dir(run_args(tmp_path)) is None
    assert not (tmp_path / "checkpoints").exists()


def test_resume_removes_the_leftovers_of_a_killed_save(tmp_path):
    save(tmp_path, 2)
    (tmp_path / "checkpoints" / ".tmp-step_4" / "model").mkdir(parents=True)
    (tmp_path / ".tmp-export").mkdir()
    plan = ckpt.prepare_output_dir(run_args(tmp_path, resume=True))
    assert plan.step == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_2"]
    assert not (tmp_path / ".tmp-export").exists()


def test_resume_from_an_older_checkpoint_makes_it_latest(tmp_path):
    for step in (2, 4):
        save(tmp_path, step)
    plan = ckpt.prepare_output_dir(run_args(tmp_path, resume_from=str(tmp_path / "checkpoints"
                                                                         / "step_2")))
    assert plan.step == 2
    scan = ckpt.scan_checkpoints(str(tmp_path))
    assert steps(scan) == [2] and "newer than" in scan.ignored[0][1]
    save(tmp_path, 4, value=7.0)  # the resumed run saves step 4 again: it replaces the old one
    assert steps(ckpt.scan_checkpoints(str(tmp_path))) == [2, 4]


@pytest.mark.parametrize("flags,message", [
    (dict(resume=True, resume_from="x"), "either --resume or --resume_from"),
    (dict(resume=True, overwrite_output_dir=True), "cannot be combined"),
    (dict(universal=True), "only applies to a resume"),
    (dict(resume_from="/nonexistent/step_3"), "is not a complete checkpoint"),
])
def test_resume_flag_errors(tmp_path, flags, message):
    with pytest.raises(ckpt.ResumeError, match=message):
        ckpt.prepare_output_dir(run_args(tmp_path, **flags))


def test_load_restores_every_engine_and_a_failed_load_is_an_error(tmp_path):
    ckpt.save_training_checkpoint(str(tmp_path), 3, {"actor": FakeEngine(1.0),
                                                     "critic": FakeEngine(2.0)}, {"epoch": 1})
    plan = ckpt.prepare_output_dir(run_args(tmp_path, resume=True))
    actor, critic = FakeEngine(), FakeEngine()
    assert ckpt.load_training_checkpoint(plan, {"actor": actor, "critic": critic}) == {"epoch": 1}
    assert (actor.value, critic.value) == (1.0, 2.0)
    with pytest.raises(ckpt.ResumeError, match="load_checkpoint returned nothing"):
        ckpt.load_training_checkpoint(plan, {"actor": FakeEngine(fail_load=True)})
    with pytest.raises(ckpt.ResumeError, match="this run needs"):
        ckpt.load_training_checkpoint(plan, {"ema": FakeEngine()})


def test_a_frozen_engine_is_saved_as_its_module_state(tmp_path):
    """An engine without an optimizer (stage 3's EMA copy): DeepSpeed cannot save_checkpoint it
    under ZeRO-3, so its full state dict is saved, and loads on any number of ranks."""
    torch.manual_seed(0)
    ema, fresh = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ckpt.save_training_checkpoint(str(tmp_path), 1, {"actor": FakeEngine(1.0), "ema": ema}, {})
    meta = ckpt.read_checkpoint_meta(str(tmp_path / "checkpoints" / "step_1"))
    assert meta["engines"]["ema"] == {"tag": "step_1", "kind": "module", "zero_stage": 0}
    plan = ckpt.prepare_output_dir(run_args(tmp_path, resume=True))
    ckpt.load_training_checkpoint(plan, {"actor": FakeEngine(), "ema": fresh})
    assert torch.equal(fresh.weight, ema.weight) and torch.equal(fresh.bias, ema.bias)
    with pytest.raises(ckpt.ResumeError, match="lacks 2 parameters"):
        ckpt.load_training_checkpoint(plan, {"ema": torch.nn.Sequential(torch.nn.Linear(3, 2))})


def test_a_missing_optimizer_partition_is_an_error(tmp_path):
    class ZeroEngine(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            super().save_checkpoint(save_dir, tag, client_state, save_latest)
            for rank in (0, 1):
                open(os.path.join(save_dir, tag, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
                     "w").close()

    path = ckpt.save_training_checkpoint(str(tmp_path), 2, {"model": ZeroEngine()}, {})
    os.remove(os.path.join(path, "model", "step_2", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    plan = ckpt.prepare_output_dir(run_args(tmp_path, resume=True))
    with pytest.raises(ckpt.ResumeError, match="holds 1 optimizer state files, the save wrote 2"):
        ckpt.load_training_checkpoint(plan, {"model": ZeroEngine()})


def test_world_size_change_of_a_zero_checkpoint_needs_universal(tmp_path):
    path = save(tmp_path, 2)
    meta = json.load(open(os.path.join(path, "complete.json")))
    meta.update(world_size=2, engines={"model": {"tag": "step_2", "zero_stage": 2}})
    ckpt.write_json_atomic(os.path.join(path, "complete.json"), meta)
    with pytest.raises(ckpt.ResumeError, match="written by 2 rank.*--universal.*weights only"):
        ckpt.prepare_output_dir(run_args(tmp_path, resume=True))


def test_export_is_atomic_per_file(tmp_path):
    def export(config):
        def write(directory):
            (open(os.path.join(directory, "config.json"), "w")).write(config)
            os.makedirs(os.path.join(directory, "sub"))
            open(os.path.join(directory, "sub", "w.bin"), "w").write(config)
        return write

    ckpt.export_atomic(str(tmp_path), export("old"))
    ckpt.export_atomic(str(tmp_path), export("new"))
    assert (tmp_path / "config.json").read_text() == "new"
    assert (tmp_path / "sub" / "w.bin").read_text() == "new"

    def broken(directory):
        open(os.path.join(directory, "config.json"), "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ckpt.export_atomic(str(tmp_path), broken)
    assert (tmp_path / "config.json").read_text() == "new"  # the previous export is intact
    assert sorted(os.listdir(tmp_path)) == [".tmp-export", "config.json", "sub"]


def test_sigterm_sets_the_stop_flag():
    stop = ckpt.StopSignal().install()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    finally:
        stop.uninstall()


def test_checkpointer_saves_when_due_and_stops_after_saving(tmp_path):
    checkpointer = ckpt.Checkpointer(str(tmp_path), {"model": FakeEngine()},
                                     run_args(tmp_path, save_steps=2, stop_after_steps=5))
    try:
        stops = [checkpointer.step_end(step, {"step": step}) for step in range(1, 6)]
    finally:
        checkpointer.close()
    assert stops == [False, False, False, False, True]
    assert steps(ckpt.scan_checkpoints(str(tmp_path))) == [2, 4, 5]


# ------------------------------------------------------------------ loaders and loop state

def test_epoch_sampler_keeps_epoch_0_and_matches_the_distributed_order():
    data = list(range(37))
    before = list(RandomSampler(data, generator=torch.Generator().manual_seed(5)))
    sampler = EpochRandomSampler(data, seed=5)
    assert list(sampler) == before                       # today's epoch-0 order is kept
    one_rank = DistributedSampler(data, num_replicas=1, rank=0, seed=5)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        one_rank.set_epoch(epoch)
        assert list(sampler) == list(one_rank) == list(sampler)  # a function of (seed, epoch)
    sampler.set_epoch(0)
    assert list(sampler) == before


def test_same_global_batch_gives_the_same_samples_per_step_on_any_world_size():
    """Why a resume on another number of ranks keeps the data order when per-device batch x
    ranks is unchanged: step i takes block i of randperm(seed + epoch) either way."""
    data, epoch = list(range(48)), 3
    single = make_loader(data, 8, None, shuffle=True, distributed=False, seed=7)
    set_loader_epoch(single, epoch)
    shards = [DistributedSampler(data, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(epoch)
    per_rank = [list(s) for s in shards]
    for i, batch in enumerate(single):
        two_ranks = per_rank[0][4 * i:4 * i + 4] + per_rank[1][4 * i:4 * i + 4]
        assert sorted(batch.tolist()) == sorted(two_ranks)


def test_iterating_a_loader_draws_nothing_from_the_global_rng():
    loader = make_loader(list(range(10)), 4, None, shuffle=True, distributed=False, seed=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch in range(2):
        set_loader_epoch(loader, epoch)
        list(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_metrics_log_keeps_the_records_up_to_the_checkpoint(tmp_path):
    log = MetricsLog(str(tmp_path), keep_lines=0)
    for step in range(5):
        log.log(step, loss=float(step))
    assert log.lines == 5
    resumed = MetricsLog(str(tmp_path), keep_lines=3)
    resumed.log(3, loss=30.0)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert resumed.lines == 4


def test_resume_position_with_another_global_batch():
    args = argparse.Namespace(per_device_train_batch_size=8, seed=3, num_train_epochs=2)
    saved = SupervisedState(epoch=1, batches_in_epoch=5, batches_per_epoch=12,
                            samples_per_batch=8, sampler_seed=3, num_train_epochs=2).to_dict()
    plan = ckpt.ResumePlan("ckpt", {"world_size": 2, "step": 17}, saved, ["model"], 1)
    same_samples = supervised_state(args, range(12), 1, plan)
    assert (same_samples.epoch, same_samples.batches_in_epoch) == (1, 5)
    plan.loop_state = dict(saved, samples_per_batch=12)
    fewer = supervised_state(args, range(18), 1, plan)      # 60 samples consumed, 8 per step
    assert (fewer.batches_in_epoch, fewer.samples_per_batch, fewer.batches_per_epoch) == (7, 8, 18)
    with pytest.raises(ckpt.ResumeError, match="--seed 4 differs"):
        supervised_state(argparse.Namespace(per_device_train_batch_size=8, seed=4,
                                            num_train_epochs=2), range(12), 1, plan)


def test_atomic_writes_leave_the_old_file_on_an_error_and_no_temp_file(tmp_path):
    """utils/atomic.py, the one home of replace-by-rename: a failing writer leaves the target as
    it was and removes its temp file; a finished one replaces it."""
    from utils.atomic import open_atomic, replaced_atomically, write_json_atomic

    path = str(tmp_path / "f.json")
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with open_atomic(path) as f:
            f.write("half")
            raise RuntimeError("disk full")
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    with pytest.raises(OSError):
        with replaced_atomically(path) as tmp:
            open(tmp, "w").close()
            raise OSError("no space left on device")
    assert sorted(os.listdir(tmp_path)) == ["f.json"]
    with open_atomic(path) as f:
        f.write("whole")
    assert open(path).read() == "whole" and sorted(os.listdir(tmp_path)) == ["f.json"]
