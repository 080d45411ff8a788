"""Stale JIT-build locks are named (a killed build's lock hangs every later run), and a stage run
leaves no shared-memory all-reduce buffer behind in /dev/shm."""
import os
import time

import pytest

import stage_runner
from utils.torch_extensions import stale_build_locks, warn_about_stale_build_locks


def test_only_old_locks_are_stale(tmp_path, capsys):
    for op, age in (("old_op", 3600), ("fresh_op", 5), ("built_op", None)):
        (tmp_path / op).mkdir()
        if age is not None:
            lock = tmp_path / op / "lock"
            lock.touch()
            os.utime(lock, (time.time() - age, time.time() - age))
    assert stale_build_locks(str(tmp_path)) == [str(tmp_path / "old_op" / "lock")]
    assert warn_about_stale_build_locks(str(tmp_path)) == [str(tmp_path / "old_op" / "lock")]
    line, = capsys.readouterr().out.splitlines()
    assert "old_op/lock" in line and "delete it" in line
    assert stale_build_locks(str(tmp_path / "missing")) == []


def test_a_leaked_buffer_for_the_launchers_port_is_found(tmp_path):
    port = stage_runner.free_port()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_1"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "main.py"]
    assert stage_runner.leaked_shm_buffers(cmd) == []
    open(os.path.join("/dev/shm", name), "w").close()
    try:
        assert stage_runner.leaked_shm_buffers(cmd) == [name]
    finally:
        os.unlink(os.path.join("/dev/shm", name))


@pytest.mark.slow
def test_two_ranks_leave_no_shm_buffer(tiny_opt_path, preference_data, tmp_path):
    """run_stage fails on a leaked buffer; this run exercises the shm all-reduce with 2 ranks."""
    out = str(tmp_path / "out")
    stage_runner.run_stage(1, stage_runner.sft_args(tiny_opt_path, preference_data, out, zero_stage=2,
                                                    extra=["--num_train_epochs", 1]), num_gpus=2)
    assert os.path.exists(os.path.join(out, "config.json"))
