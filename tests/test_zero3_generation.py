"""Generation under ZeRO-3 without the hybrid engine (utils/zero3_generation.py): the memory check's
decision, the hook suspension, the cases that change nothing, the trainer's synced_gpus and the
flag; on 2 ranks through the launcher, the same answers with the parameters gathered once as per
layer, one fetch per parameter instead of one per decoded token, everything restored, training
afterwards unchanged; the quick benchmark."""
import contextlib
import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer import PolicyTrainer, RolloutSettings
from utils import zero3_generation
from utils.zero3_generation import (GENERATION_HEADROOM, gather_decision, generation_parameters,
                                    parameter_offload, suspended_hooks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20


# ------------------------------------------------------------------------------ the decision

def test_gather_decision_keeps_headroom():
    free = 1000 * MIB
    fits, reason = gather_decision(int((1 - GENERATION_HEADROOM) * free), free)
    assert fits and "800.0 MiB" in reason and "1000.0 MiB" in reason
    fits, reason = gather_decision(int((1 - GENERATION_HEADROOM) * free) + 1, free)
    assert not fits and "800.0 MiB" in reason and "1000.0 MiB" in reason and "20%" in reason
    assert not gather_decision(600 * MIB, free, headroom=0.5)[0]
    assert gather_decision(10 * MIB, None)[0]           # free memory unknown: gather
    assert gather_decision(0, 0)[0]                     # nothing partitioned: nothing to hold


def test_agreed_decision_without_a_process_group():
    assert zero3_generation._agreed_decision(100, None)[0]
    fits, reason = zero3_generation._agreed_decision(1024 * MIB, MIB)
    assert not fits and "1024.0 MiB" in reason and "1.0 MiB" in reason


def test_free_memory_on_the_cpu_is_shared_by_the_local_ranks(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8388608 kB\n")
    assert zero3_generation._meminfo_available_bytes(str(meminfo)) == 8 * 2 ** 30
    assert zero3_generation._meminfo_available_bytes(str(tmp_path / "missing")) is None
    monkeypatch.setattr(zero3_generation, "_meminfo_available_bytes", lambda: 8 * 2 ** 30)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                  # torchrun
    assert zero3_generation.free_memory_bytes("cpu") == 4 * 2 ** 30
    monkeypatch.setenv("LOCAL_SIZE", "4")                        # the deepspeed launcher
    assert zero3_generation.free_memory_bytes("cpu") == 2 * 2 ** 30
    monkeypatch.setattr(zero3_generation, "_meminfo_available_bytes", lambda: None)
    assert zero3_generation.free_memory_bytes("cpu") is None
    assert zero3_generation.free_memory_bytes("xpu") is None   # unknown: the decision gathers


# ------------------------------------------------------------------------------ the hooks

def test_suspended_hooks_come_back_in_place():
    layer = nn.Linear(2, 2)
    fired = []
    mark = lambda name: (lambda *args, **kwargs: fired.append(name))  # noqa: E731
    layer.register_forward_pre_hook(mark("foreign-pre-1"))
    ds_pre = layer.register_forward_pre_hook(mark("ds-pre"))
    layer.register_forward_pre_hook(mark("foreign-pre-2"))
    ds_post = layer.register_forward_hook(mark("ds-post"), with_kwargs=True, always_call=True)
    layer.register_forward_hook(mark("foreign-post"))
    before = {name: list(getattr(layer, name)) for name in (
        "_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called")}
    x = torch.ones(1, 2)
    with suspended_hooks([ds_pre, ds_post]):
        layer(x)
        assert fired == ["foreign-pre-1", "foreign-pre-2", "foreign-post"]
        late = layer.register_forward_pre_hook(mark("late-pre"))
    fired.clear()
    layer(x)
    assert fired == ["foreign-pre-1", "ds-pre", "foreign-pre-2", "late-pre", "ds-post",
                     "foreign-post"]
    assert list(layer._forward_pre_hooks) == before["_forward_pre_hooks"] + [late.id]
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        assert list(getattr(layer, name)) == before[name]
    # An exception inside the block restores them too; the handles still remove their hooks.
    with pytest.raises(KeyError), suspended_hooks([ds_pre]):
        raise KeyError("inside")
    assert ds_pre.id in layer._forward_pre_hooks
    ds_pre.remove()
    ds_post.remove()
    fired.clear()
    layer(x)
    assert fired == ["foreign-pre-1", "foreign-pre-2", "late-pre", "foreign-post"]


def test_nothing_changes_without_a_zero3_engine():
    module = nn.Linear(2, 2)
    hooks = dict(module._forward_pre_hooks)
    sgd = torch.optim.SGD(module.parameters(), 0.1)
    for engine in (module, SimpleNamespace(module=module, optimizer=None),
                   SimpleNamespace(module=module, optimizer=sgd)):
        assert parameter_offload(engine) is None
        with generation_parameters(engine) as gathered:
            assert gathered is False
        with generation_parameters(engine, enabled=False) as gathered:
            assert gathered is False
    assert dict(module._forward_pre_hooks) == hooks


@pytest.mark.parametrize("gathered, synced, expected", [
    (True, True, False), (False, True, True), (True, False, False), (False, False, False)])
def test_generate_drops_synced_gpus_only_when_gathered(monkeypatch, gathered, synced, expected):
    seen = {}

    class Actor:
        def generate(self, **kwargs):
            seen.update(kwargs)
            return kwargs["input_ids"]

    @contextlib.contextmanager
    def fake_gather(engine, enabled=True):
        seen["enabled"] = enabled
        yield gathered and enabled

    import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "generation_parameters", fake_gather)
    trainer = PolicyTrainer.__new__(PolicyTrainer)
    trainer.actor, trainer.pad_token_id, trainer.eos_token_ids = Actor(), 1, [2]
    trainer.nonfinite_logits = trainer_module.NonFiniteLogits()
    for enabled in (True, False):
        trainer.rollout = RolloutSettings(max_answer_seq_len=4, synced_gpus=synced,
                                          gather_once_for_generation=enabled)
        trainer._generate(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), do_sample=False)
        assert seen["enabled"] is enabled
        assert seen["synced_gpus"] is (expected if enabled else synced)


def load_stage3_main():
    spec = importlib.util.spec_from_file_location(
        "stage3_main_for_zero3_generation", os.path.join(ROOT, "step3_rlhf_finetuning", "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_switches_gathering_off(tmp_path):
    stage3 = load_stage3_main()
    config = SimpleNamespace(vocab_size=512, model_type="opt")
    base = ["--actor_model_name_or_path", "a", "--reward_model_name_or_path", "r",
            "--output_dir", str(tmp_path), "--actor_zero_stage", "3"]
    args = stage3.parse_args(base)
    assert stage3.rollout_settings(args, 2, False, config).gather_once_for_generation
    assert stage3.rollout_settings(args, 2, False, config).synced_gpus
    # The hybrid engine gathers by itself (its generate, when it injects kernels).
    assert not stage3.rollout_settings(args, 2, True, config).gather_once_for_generation
    args = stage3.parse_args(base + ["--per_layer_generation_gather"])
    assert not stage3.rollout_settings(args, 2, False, config).gather_once_for_generation


# ------------------------------------------------------------------ 2 ranks, through the launcher

@pytest.mark.slow
def test_two_ranks_gather_once_matches_per_layer(tiny_opt_path, tmp_path):
    from stage_runner import free_port, run_command

    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    code, output = run_command([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
                                os.path.join(ROOT, "tests", "zero3_generation_run.py"),
                                "--model", tiny_opt_path, "--out", str(tmp_path)], timeout=300)
    assert code == 0, output[-4000:]
    assert "per-layer gathering while decoding, because the gathered actor would not fit" in output
    assert "gathered once per generate call, and ranks decode without synced_gpus" in output
    for rank, answer_len in ((0, 10), (1, 5)):
        report = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        per_layer, once, fallback = report["per_layer"], report["gather_once"], report["fallback"]
        partitioned = once["partitioned_at_entry"]
        assert 0 < partitioned < once["params"]   # persistent parameters are left alone
        for mode in (per_layer, once, fallback):
            assert mode["answer_lengths"] == dict.fromkeys(("greedy", "sampled", "decode"),
                                                           answer_len)
            assert mode["hooks_restored"] and mode["statuses_restored"], (rank, mode)
            assert mode["gathered_inside"] == [True, True] and mode["restored_after_error"]
            # Training afterwards: the same losses and gradients as an actor that never generated.
            assert mode["same_losses_as_control"] and mode["grad_diff_to_control"] == 0.0
            assert mode["zero3_state_after_training_as_control"], (rank, mode)
        for call in ("greedy", "sampled", "decode"):
            assert once["same_answers"][call] and fallback["same_answers"][call], (rank, call)
            # Once per parameter per generate call, against once per parameter per forward: 10
            # forwards on both ranks, since per layer rank 1 keeps decoding in step with rank 0.
            assert once["counts"][call]["param_fetches"] == partitioned
            assert per_layer["counts"][call]["param_fetches"] == 10 * partitioned
            assert fallback["counts"][call]["param_fetches"] == 10 * partitioned
            assert once["counts"][call]["all_gather_elements"] * 5 < \
                per_layer["counts"][call]["all_gather_elements"]
            # No synced_gpus flags: the decision's all-reduce only.
            assert once["counts"][call]["all_reduce_calls"] == 1
            assert per_layer["counts"][call]["all_reduce_calls"] >= 10


@pytest.mark.slow
def test_quick_benchmark(tmp_path):
    import subprocess

    out = tmp_path / "zero3_generation"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.zero3_generation", "--quick", "--out",
                           str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = json.loads((out / "zero3_generation.json").read_text())
    once, per_layer = report["rows"]["gather-once"], report["rows"]["per-layer"]
    assert report["worker"]["same_answers"] is True
    assert once["fetches_per_param"] == 1.0 and per_layer["fetches_per_param"] == 8.0  # 8 tokens
    assert once["generation_s"] > 0 and per_layer["generation_s"] > 0
    assert once["all_reduce_calls"] == 1 and per_layer["all_reduce_calls"] > 1
    text = (out / "zero3_generation.md").read_text()
    assert "| gather-once `(default)` |" in text and "--per_layer_generation_gather" in text
