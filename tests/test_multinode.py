"""Two "nodes" of one rank each on this host, through the launcher's multi-node mode (a hostfile
of two hosts, one `deepspeed --no_ssh --node_rank i` per node, as a scheduler starts them): the
ranks meet over TCP (gloo) rather than one node's shared memory. Stages 1 and 3 train a few steps;
a dataset that only node 0 can see stops both nodes with one line naming rank 1 and its host.
"""
import os
import socket

import pytest

from stage_runner import cache_dir, remax_args, run_two_nodes, sft_args
from utils.training import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("node-a slots=1\nnode-b slots=1\n")
    return str(path)


def assert_both_finished(results, out):
    for node, (returncode, output) in enumerate(results):
        assert returncode == 0, f"node {node}:\n{output[-4000:]}"
    assert os.path.exists(os.path.join(out, "run_complete.json"))


def test_stage1_on_two_nodes(tiny_opt_path, preference_data, hostfile, tmp_path):
    out = str(tmp_path / "out")
    results = run_two_nodes(1, sft_args(tiny_opt_path, preference_data, out, 2,
                                        extra=["--num_train_epochs", 1, "--evals_per_epoch", 1]),
                            hostfile)
    assert_both_finished(results, out)
    assert "world_size=2" in results[0][1], results[0][1][-3000:]
    assert any("Train/loss" in r for r in read_metrics(out))
    assert not os.path.exists(os.path.join(out, ".preflight"))


def test_stage3_on_two_nodes(sft_opt, reward_opt, preference_data, hostfile, tmp_path):
    out = str(tmp_path / "out")
    results = run_two_nodes(3, remax_args(sft_opt, reward_opt, preference_data, out, 3, 0, 0, 1,
                                          extra=["--test_stop_step", 2]), hostfile)
    assert_both_finished(results, out)
    assert len([r for r in read_metrics(out) if "train/reward" in r]) == 2


def test_a_dataset_only_node_0_sees_stops_both_nodes_with_one_line(tiny_opt_path, preference_data,
                                                                   hostfile, tmp_path):
    """--data_path relative to each node's working directory: node 1's has no such dataset."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    os.symlink(os.path.dirname(os.path.dirname(preference_data)), node0 / "data")
    relative = os.path.join("data", "Dahoas", "rm-static")
    out = str(tmp_path / "out")
    args = sft_args(tiny_opt_path, relative, out, 2, extra=["--num_train_epochs", 1])
    results = run_two_nodes(1, args, hostfile, timeout=300, cwds=(str(node0), str(node1)))
    for node, (returncode, output) in enumerate(results):
        assert returncode != 0 and "Traceback" not in output, f"node {node}:\n{output[-4000:]}"
    errors = [line for line in results[0][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, results[0][1][-3000:]
    assert errors[0].startswith(f"error: rank 1 on host {socket.gethostname()}: --data_path {relative}: "), errors[0]
    assert not any(line.startswith("error:") for line in results[1][1].splitlines())
    assert not os.path.exists(cache_dir(out)) or not os.listdir(cache_dir(out))


def test_an_output_dir_that_is_not_shared_stops_both_nodes_with_one_line(tiny_opt_path, preference_data,
                                                                        hostfile, tmp_path):
    """A relative --output_dir from two working directories: two directories, as on local disks."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    args = sft_args(tiny_opt_path, preference_data, "out", 2, extra=["--num_train_epochs", 1])
    results = run_two_nodes(1, args, hostfile, timeout=300, cwds=(str(node0), str(node1)))
    for node, (returncode, output) in enumerate(results):
        assert returncode != 0 and "Traceback" not in output, f"node {node}:\n{output[-4000:]}"
    errors = [line for line in results[0][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, results[0][1][-3000:]
    assert "--output_dir out is not one directory for all ranks" in errors[0]
    assert "file system every node shares" in errors[0]
    for node in (node0, node1):
        assert not os.path.exists(node / "out" / ".preflight")
