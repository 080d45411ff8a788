"""EMA update and the frozen-model ZeRO stage rule of the stage-3 engine."""
import torch
from torch import nn

from rlhf_engine import frozen_model_stage, moving_average


def test_moving_average_is_deepspeed_chat_rule():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    moving_average(model, ema, beta=0.9)
    for p, e, old in zip(model.parameters(), ema.parameters(), before):
        # ema <- 0.9 * ema + 0.1 * param
        torch.testing.assert_close(e, 0.9 * old + 0.1 * p.detach())


def test_moving_average_rejects_mismatched_models():
    import pytest
    with pytest.raises(RuntimeError, match="pair up"):
        moving_average(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))


def test_frozen_models_run_at_zero_0_or_3():
    assert frozen_model_stage(3, "reward") == 3
    assert frozen_model_stage(0, "reward") == 0
    assert frozen_model_stage(2, "reference") == 0
    assert frozen_model_stage(1, "reference") == 0
