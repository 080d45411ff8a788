"""Model loading in the engine's dtype, through real DeepSpeed engines on 2 ranks (ZeRO 2/0 and 3,
fp32 and bf16 engines, fp32 and bf16 checkpoints), and the quick mode of the load-memory benchmark.

The engines must end up with the weights of the old path, an fp32 load followed by DeepSpeed's
cast: every checkpoint tensor converted to float32, then to the engine's dtype. Under ZeRO-3 the
model is built partitioned, and the reward checkpoint's tensors are read on rank 0 only."""
import json
import os
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGINES_SCRIPT = textwrap.dedent("""
    import contextlib, io, os, sys
    from types import SimpleNamespace
    ROOT = os.environ["REPO_ROOT"]
    sys.path[:0] = [ROOT, os.path.join(ROOT, "step3_rlhf_finetuning")]
    import deepspeed, torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from rlhf_engine import frozen_actor_copy_ds_config, moving_average
    from utils.ds_utils import get_eval_ds_config, get_train_ds_config, set_batch_sizes
    from utils.model import reward_model
    from utils.model.model_utils import (count_parameters, create_critic_model, create_hf_model,
                                         load_hf_tokenizer)
    from utils.module.lora import gathered_parameters
    from utils.training import init_eval_engine, init_train_engine

    paths = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]   # the launcher's
    actor_dirs = {"fp32": paths[0], "bf16": paths[1]}
    reward_dirs = {"fp32": paths[2], "bf16": paths[3]}
    from utils.utils import init_distributed
    _, rank, _ = init_distributed()   # unlinks DeepSpeed's /dev/shm all-reduce buffer
    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def full(param):
        with gathered_parameters([param]):
            return param.data.detach().clone()

    def check_weights(engine, expected, dtype, what):
        checked = 0
        for name, param in engine.module.named_parameters():
            if name in expected:
                value = full(param)
                assert value.dtype == dtype, (what, name, value.dtype)
                assert torch.equal(value, expected[name].float().to(dtype)), (what, name)
                checked += 1
        assert checked >= len(expected) - 1, (what, checked, len(expected))   # a tied head

    actor_engines = {}
    for stage in (2, 3):
        for precision in ("fp32", "bf16"):
            for checkpoint in ("fp32", "bf16"):
                what = f"actor ZeRO {stage} {precision} engine {checkpoint} checkpoint"
                tokenizer = load_hf_tokenizer(actor_dirs[checkpoint])
                config = set_batch_sizes(get_train_ds_config(False, stage=stage,
                                                             precision=precision), 1, 2, 1)
                model = create_hf_model(AutoModelForCausalLM, actor_dirs[checkpoint], tokenizer,
                                        config)
                if stage == 3:   # built partitioned: no rank ever held the whole model
                    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()), what
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    engine = init_train_engine(model, None, config, 1e-3, 0.0, 5e-4, 10, "linear", 0)
                if rank == 0:
                    line = next(l for l in out.getvalue().splitlines() if l.startswith("[optimizer]"))
                    count = f"{count_parameters(engine) / 1e6:.2f}M trainable parameters (the whole model's"
                    assert count in line and count_parameters(engine) > 100_000, (what, line)
                expected = load_file(os.path.join(actor_dirs[checkpoint], "model.safetensors"))
                check_weights(engine, expected, DTYPES[precision], what)
                actor_engines[(stage, precision, checkpoint)] = engine
                print("OK", what, flush=True)

    real_getitem = reward_model.LazyStateDict.__getitem__
    for stage in (0, 3):
        for precision in ("fp32", "bf16"):
            for checkpoint in ("fp32", "bf16"):
                what = f"reward ZeRO {stage} {precision} engine {checkpoint} checkpoint"
                path = reward_dirs[checkpoint]
                expected, _ = reward_model.read_reward_checkpoint(path)
                reads = []
                reward_model.LazyStateDict.__getitem__ = (
                    lambda self, key: reads.append(key) or real_getitem(self, key))
                config = set_batch_sizes(get_eval_ds_config(False, stage, precision=precision),
                                         1, 2, 1)
                model = create_critic_model(path, load_hf_tokenizer(path), config, 0,
                                            rlhf_training=True)
                reward_model.LazyStateDict.__getitem__ = real_getitem
                if stage == 3 and rank != 0:   # the head (one row) is not partitioned yet
                    assert set(reads) <= {"v_head.weight"}, (what, reads)
                else:
                    assert sorted(reads) == sorted(expected), what
                engine = init_eval_engine(model, config)
                check_weights(engine, expected, DTYPES[precision], what)
                ids = torch.tensor([[1, 5, 6, 7, 2, 2], [1, 9, 8, 2, 2, 2]])
                with torch.no_grad():
                    values = engine.module.forward_value(ids, return_value_only=True)
                assert values.dtype == torch.float32, what
                gathered = [torch.empty_like(values) for _ in range(2)]
                dist.all_gather(gathered, values)
                assert torch.equal(gathered[0], gathered[1]), what
                print("OK", what, flush=True)

    # The EMA: float32 whatever the actor's precision, through the same ZeRO-3 gathers.
    actor = actor_engines[(3, "bf16", "fp32")]
    args = SimpleNamespace(actor_bf16=True, reference_zero_stage=3, offload_reference_model=False)
    ema_config = set_batch_sizes(frozen_actor_copy_ds_config(args, ema=True), 1, 2, 1)
    ema = init_eval_engine(create_hf_model(AutoModelForCausalLM, actor_dirs["fp32"],
                                           load_hf_tokenizer(actor_dirs["fp32"]), ema_config),
                           ema_config)
    with torch.no_grad():
        for param in actor.module.parameters():
            with gathered_parameters([param], modifier_rank=0):
                if rank == 0:
                    param.add_(0.01)
    starts = [full(p).double() for p in ema.module.parameters()]
    for _ in range(3):
        moving_average(actor, ema, beta=0.9)
    for param, start, target in zip(ema.module.parameters(), starts, actor.module.parameters()):
        value, target = full(param), full(target).double()
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), target + (start - target) * 0.9 ** 3,
                                   rtol=0, atol=1e-6)
    print("OK ema", flush=True)
    print("ENGINES_OK", rank, flush=True)
""")


@pytest.fixture(scope="module")
def checkpoint_dirs(tiny_opt_path, tiny_llama_path, tmp_path_factory):
    """[actor fp32, actor bf16, reward fp32, reward bf16]: the tiny OPT and a bf16 copy; reward
    models (tiny Llama backbone, our layout) in fp32 and bf16."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from utils.model.model_utils import load_hf_tokenizer, save_reward_model
    from utils.model.reward_model import RewardModel

    root = tmp_path_factory.mktemp("load_precision")
    actor_bf16 = str(root / "actor-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_opt_path, dtype=torch.bfloat16).save_pretrained(actor_bf16)
    AutoTokenizer.from_pretrained(tiny_opt_path).save_pretrained(actor_bf16)
    tokenizer = load_hf_tokenizer(tiny_llama_path)
    torch.manual_seed(0)
    reward = RewardModel(AutoModel.from_pretrained(tiny_llama_path), tokenizer.pad_token_id)
    with torch.no_grad():
        reward.v_head.weight.normal_()
    dirs = [tiny_opt_path, actor_bf16]
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = str(root / f"reward-{name}")
        save_reward_model(reward.to(dtype), tokenizer, out, 0, rank=0)
        dirs.append(out)
    return dirs


@pytest.mark.slow
def test_engines_get_the_old_weights_zero3_partitioned_and_rank_0_reads(checkpoint_dirs, tmp_path):
    from stage_runner import free_port, run_command

    script = tmp_path / "engines.py"
    script.write_text(ENGINES_SCRIPT)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    code, output = run_command([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
                                str(script), *checkpoint_dirs], env={"REPO_ROOT": ROOT},
                               timeout=600)
    assert code == 0, output[-4000:]
    assert output.count("ENGINES_OK") == 2, output[-4000:]


@pytest.mark.slow
def test_load_memory_benchmark_quick(tmp_path):
    """The benchmark's --quick mode: every row measured before and after on 2 ranks, a table."""
    from stage_runner import run_command

    out = tmp_path / "out"
    code, output = run_command([sys.executable, "-m", "benchmarks.load_memory", "--quick",
                                "--out", str(out), "--cache", str(tmp_path / "cache")],
                               timeout=900)
    assert code == 0, output[-4000:]
    report = json.loads((out / "load_memory.json").read_text())
    rows = report["rows"]
    assert [(r["model"], r["zero"], r["precision"], r["checkpoint"]) for r in rows] == [
        ("actor", 2, "bf16", "fp32"), ("actor", 3, "bf16", "fp32"),
        ("reward", 2, "bf16", "fp32"), ("reward", 3, "bf16", "fp32")]
    for row in rows:
        for code_name in ("before", "after"):
            ranks = row[code_name]
            assert [r["rank"] for r in ranks] == [0, 1]
            for r in ranks:
                for phase in ("load", "init"):
                    assert r[phase]["peak_rss_mib"] >= r["floor"]["VmRSS"] > 100
                assert r["init"]["peak_rss_mib"] >= r["load"]["peak_rss_mib"]
                assert r["parameters"] == ranks[0]["parameters"] > 1_000_000
                assert r["engine_dtypes"] == ["bfloat16"]       # DeepSpeed's cast, both codes
            assert ranks[0]["partitioned"] == (row["zero"] == 3)
        # after: the engine's dtype from the load on; before: fp32 below ZeRO 3
        assert row["after"][0]["dtypes"] == ["bfloat16"]
        if row["zero"] == 2:
            assert row["before"][0]["dtypes"] == ["float32"]
            assert row["after"][0]["held_mib"] == pytest.approx(row["before"][0]["held_mib"] / 2,
                                                                rel=0.01)
    table = (out / "load_memory.md").read_text()
    assert table.startswith("| model | ZeRO | engine | checkpoint | model MiB | code |")
    assert len([line for line in table.splitlines() if line.startswith("| actor")]) == 4


@pytest.mark.slow
def test_stage2_trains_in_bf16_under_zero3_on_two_ranks(tiny_llama_path, preference_data, tmp_path):
    """Stage 2 in a bf16 engine, ZeRO 3 on 2 ranks: the backbone loads in bf16, the fresh head
    (initialised in fp32) is stored in bf16 like the partitioned backbone, the float32 head and
    loss train it: the loss stays finite and the accuracy rises above chance."""
    from safetensors import safe_open

    from stage_runner import reward_args, run_stage
    from utils.training import read_metrics

    out = str(tmp_path / "reward-bf16")
    output = run_stage(2, reward_args(tiny_llama_path, preference_data, out, zero_stage=3,
                                      pad_at_beginning=0, extra=["--bf16"]), num_gpus=2)
    assert "training in bf16" in output
    records = read_metrics(out)
    losses = [r[k] for r in records for k in r if "loss" in k.lower() and isinstance(r[k], float)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    evals = [r["Test/acc"] for r in records if "Test/acc" in r]
    assert evals[-1] >= 0.7 and evals[-1] > evals[0], evals
    with safe_open(os.path.join(out, "value_head.safetensors"), "pt") as f:
        assert f.get_tensor("v_head.weight").dtype == torch.bfloat16
