"""The rollout's next-token choice (step3_rlhf_finetuning/sampling.py): non-finite logits never
reach torch.multinomial, they are counted, and the update they belong to is skipped; the LM head
in float32 for half-precision models (utils/model/lm_head.py)."""
import pytest
import torch

from sampling import FiniteLogits, NonFiniteLogits, TopKTopPSampler, sampling_kwargs
from utils.model.lm_head import float32_lm_head
from utils.model.model_utils import lm_head_inputs
from utils.nonfinite import NonFiniteUpdates

EOS = 3


def bad_logits():
    torch.manual_seed(0)
    scores = torch.randn(5, 12)
    scores[1, 4] = float("nan")
    scores[2, 7] = float("inf")
    scores[3] = float("-inf")
    scores[4, :6] = float("-inf")        # some -inf is fine (masked tokens): row stays
    return scores


def test_non_finite_rows_become_eos_only_and_are_counted():
    watch = NonFiniteLogits()
    scores = bad_logits()
    out = FiniteLogits(EOS, watch)(None, scores)
    for row in (1, 2, 3):
        assert out[row].argmax() == EOS and torch.isfinite(out[row]).sum() == 1
    assert torch.equal(out[[0, 4]], scores[[0, 4]])
    FiniteLogits(EOS, watch)(None, scores[:2])
    assert watch.pop() == 4          # 3 + 1 bad rows over two steps
    assert watch.pop() == 0


def test_without_the_guard_multinomial_fails_and_with_it_every_row_samples():
    # On CUDA this is a device-side assert that kills the process; on the CPU a RuntimeError.
    sampler = TopKTopPSampler(5, 0.9)
    with pytest.raises(RuntimeError):
        sampler(None, bad_logits())
    out = sampler(None, FiniteLogits(EOS, NonFiniteLogits())(None, bad_logits()))
    assert torch.isfinite(out).sum(-1).tolist() == [1] * 5
    assert out[1:4].argmax(-1).tolist() == [EOS] * 3


def test_injection_makes_one_row_of_one_step_non_finite():
    watch = NonFiniteLogits()
    watch.inject = True
    finite = FiniteLogits(EOS, watch)
    scores = torch.zeros(2, 6)
    first = finite(None, scores)
    assert first[0].argmax() == EOS and torch.isfinite(first[0]).sum() == 1
    assert torch.equal(finite(None, scores), scores)     # once only
    assert watch.pop() == 1 and torch.equal(scores, torch.zeros(2, 6))  # input not modified


@pytest.mark.parametrize("do_sample,fused", [(False, True), (True, True), (True, False)])
def test_the_guard_runs_first_in_every_decoding_mode(do_sample, fused):
    finite = FiniteLogits(EOS, NonFiniteLogits())
    kwargs = sampling_kwargs(do_sample, fused, torch.tensor([False, True]), finite)
    assert kwargs["logits_processor"][0] is finite
    assert kwargs["do_sample"] == (do_sample and not fused)


def test_poison_makes_every_loss_of_the_update_non_finite_until_the_next_update(capsys):
    guard = NonFiniteUpdates()
    guard.begin_update(4)
    loss, bad = guard.agree(torch.tensor(1.5))
    assert bad == 0 and loss.item() == 1.5
    guard.poison("non-finite logits in 2 decoding step(s)")
    assert "update 4, rank 0: non-finite logits" in capsys.readouterr().out
    loss, bad = guard.agree(torch.tensor(1.5))
    assert bad == 1 and torch.isnan(loss)
    guard.begin_update(5)
    assert guard.agree(torch.tensor(1.5))[1] == 0


def test_float32_head_gives_float32_logits_and_gradients_of_the_half_weights():
    torch.manual_seed(1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(64, 300, bias=False, dtype=torch.bfloat16)

        def get_output_embeddings(self):
            return self.head

    model = Model()
    hidden = torch.randn(3, 64, dtype=torch.bfloat16)
    half = model.head(hidden)
    note = float32_lm_head(model)
    assert "float32 logits" in note
    logits = model.head(hidden)
    assert logits.dtype == torch.float32 and half.dtype == torch.bfloat16
    expected = hidden.float() @ model.head.weight.float().T
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert (logits - half.float()).abs().max() > 0          # bf16 rounding is gone
    logits.sum().backward()
    assert model.head.weight.grad.dtype == torch.bfloat16
    # The capture used by the chunked scoring restores the float32 forward afterwards.
    with lm_head_inputs(model.head) as captured:
        model.head(hidden)
    assert len(captured) == 1 and model.head(hidden).dtype == torch.float32
    assert "already float32" in float32_lm_head(Model().float())


def test_float32_head_leaves_other_heads_alone():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Sequential(torch.nn.Linear(4, 4))

        def get_output_embeddings(self):
            return self.head

    assert "not a plain Linear" in float32_lm_head(Wrapped())


def test_float32_head_removes_the_bf16_rounding_of_log_probs_and_log_ratios():
    """The benchmark's measurement at a small size: against float64, bf16 logits are off by about
    1e-3 per token (as large as the ratios they feed), float32 logits by about 1e-6."""
    from benchmarks.lm_head_precision import measure

    bf16, fp32 = measure(hidden_size=128, vocab=1000, rows=2, answer_len=8, chunks=2, repeats=1)
    assert bf16["mode"] == "bf16" and fp32["mode"] == "fp32"
    assert bf16["ratio_error_mean"] > 1e-4 and fp32["ratio_error_mean"] < 1e-5
    assert fp32["logprob_error_max"] < bf16["logprob_error_max"] / 100
