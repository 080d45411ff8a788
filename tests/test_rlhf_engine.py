"""EMA update, the frozen-model ZeRO stage rule and the precisions of the stage-3 engines."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf_engine import (critic_ds_config, frozen_actor_copy_ds_config, frozen_model_stage,
                         moving_average)
from utils.model.model_utils import engine_dtype


def test_moving_average_is_deepspeed_chat_rule():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    moving_average(model, ema, beta=0.9)
    for p, e, old in zip(model.parameters(), ema.parameters(), before):
        # ema <- 0.9 * ema + 0.1 * param
        torch.testing.assert_close(e, 0.9 * old + 0.1 * p.detach())


def test_moving_average_rejects_mismatched_models():
    with pytest.raises(RuntimeError, match="pair up"):
        moving_average(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))


def test_frozen_models_run_at_zero_0_or_3():
    assert frozen_model_stage(3, "reward") == 3
    assert frozen_model_stage(0, "reward") == 0
    assert frozen_model_stage(2, "reference") == 0
    assert frozen_model_stage(1, "reference") == 0


# ----------------------------------------------------------------------------- precisions

def stage3_args(**flags):
    defaults = dict(offload=False, critic_zero_stage=2, enable_tensorboard=False,
                    tensorboard_path="", actor_bf16=False, reward_bf16=False,
                    reference_zero_stage=0, offload_reference_model=False)
    return SimpleNamespace(**{**defaults, **flags})


def test_critic_follows_reward_bf16_not_actor_bf16():
    """The critic starts from the reward model: --reward_bf16 sets its precision (on the CPU the
    default is fp32, on CUDA fp16, as every model's)."""
    assert engine_dtype(critic_ds_config(stage3_args(reward_bf16=True))) == torch.bfloat16
    assert engine_dtype(critic_ds_config(stage3_args(actor_bf16=True))) == torch.float32
    both = critic_ds_config(stage3_args(actor_bf16=True, reward_bf16=True, critic_zero_stage=3))
    assert both["bf16"] == {"enabled": True} and both["zero_optimization"]["stage"] == 3


def test_ema_is_float32_whatever_the_actor_and_the_reference_follows_the_actor():
    for actor_bf16 in (False, True):
        args = stage3_args(actor_bf16=actor_bf16, reference_zero_stage=3)
        ema = frozen_actor_copy_ds_config(args, ema=True)
        assert engine_dtype(ema) == torch.float32 and ema["zero_optimization"]["stage"] == 3
        reference = frozen_actor_copy_ds_config(args)
        assert engine_dtype(reference) == (torch.bfloat16 if actor_bf16 else torch.float32)


def test_ema_engine_model_is_built_in_float32_for_a_bf16_actor(tiny_opt_path):
    from transformers import AutoModelForCausalLM

    from utils.model.model_utils import create_hf_model, load_hf_tokenizer

    config = frozen_actor_copy_ds_config(stage3_args(actor_bf16=True), ema=True)
    model = create_hf_model(AutoModelForCausalLM, tiny_opt_path, load_hf_tokenizer(tiny_opt_path),
                            config)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_actor_float32_ema_moves_as_the_formula_over_many_steps():
    """500 steps of ema <- 0.992 ema + 0.008 θ towards a bf16 actor: the float32 EMA follows the
    exact formula; a bf16 EMA (the reference's precision, before) loses most of each step."""
    torch.manual_seed(0)
    actor = nn.Linear(64, 64).to(torch.bfloat16)
    ema32, ema16 = nn.Linear(64, 64), nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        for a, e32, e16 in zip(actor.parameters(), ema32.parameters(), ema16.parameters()):
            start = (a.float() + 0.05 * torch.randn_like(a.float())).to(torch.bfloat16)
            e32.copy_(start.float())
            e16.copy_(start)
    starts = [e.detach().double().clone() for e in ema32.parameters()]
    beta, steps = 0.992, 500
    for _ in range(steps):
        moving_average(actor, ema32, beta)
        moving_average(actor, ema16, beta)
    for a, e32, e16, start in zip(actor.parameters(), ema32.parameters(), ema16.parameters(), starts):
        target = a.detach().double()
        exact = target + (start - target) * beta ** steps       # 98.2 % of the way
        assert e32.dtype == torch.float32
        torch.testing.assert_close(e32.detach().double(), exact, rtol=0, atol=2e-6)
        moved = ((e32.double() - start).abs().sum() / (target - start).abs().sum()).item()
        moved_bf16 = ((e16.double() - start).abs().sum() / (target - start).abs().sum()).item()
        assert moved == pytest.approx(1 - beta ** steps, abs=1e-3)
        assert moved_bf16 < 0.6                   # about half: many bf16 increments round away


def test_trainable_count_under_zero3_is_the_whole_models(monkeypatch, capsys):
    """Partitioned parameters have numel 0 (ds_numel holds their full size): the optimizer line
    counts the whole model's trainable parameters, the same on every rank."""
    import deepspeed

    from utils.ds_utils import get_train_ds_config
    from utils.training import init_train_engine

    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 20))     # 5050 + 1020 parameters
    for param in model.parameters():                                  # as zero.Init leaves them
        param.ds_numel, param.ds_id = param.numel(), id(param)
        param.data = torch.empty(0)
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: (kwargs["model"], None, None, None))
    config = get_train_ds_config(False, stage=3, precision="fp32")
    init_train_engine(model, None, config, 1e-3, 0.0, 5e-4, 10, "linear", 0)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("[optimizer]"))
    assert "0.01M trainable parameters (the whole model's, not one ZeRO-3 rank's share)" in line   # 6070
    assert "0.00M" not in line
