"""Unit tests of the ReMax math, with values that can be checked on paper."""
import math

import pytest
import torch

from algorithms import compute_returns, policy_gradient_loss
from rl_math import (action_mask_from_sequences, answer_lengths, chunked_answer_scores,
                     entropy_and_full_kl_from_logits, fix_degenerate_answers, gather_log_probs,
                     kl_penalty, masked_max_from, masked_mean_from, truncated_rate)

PAD = 2  # in step 3 pad == eos (and OPT's BOS </s> has the same id)


# ---------------------------------------------------------------------------------------------- log-probs
def test_gather_log_probs_hand_values():
    # position 0: uniform over 3 -> log(1/3); position 1: probabilities (.2, .3, .5) shifted by +5.
    logits = torch.tensor([[[0.0, 0.0, 0.0],
                            [math.log(0.2) + 5, math.log(0.3) + 5, math.log(0.5) + 5]]])
    labels = torch.tensor([[0, 1]])
    out = gather_log_probs(logits, labels)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[math.log(1 / 3), math.log(0.3)]]))


def test_gather_log_probs_shapes_and_dtype():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    seq = torch.randint(0, 11, (2, 6))
    out = gather_log_probs(logits[:, :-1], seq[:, 1:])
    assert out.shape == (2, 5) and out.dtype == torch.float32
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out, expected)
    assert gather_log_probs(logits.bfloat16(), seq).dtype == torch.float32


def test_kl_penalty():
    out = kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), kl_ctl=0.5)
    torch.testing.assert_close(out, torch.tensor([-0.25, 0.5]))


# ---------------------------------------------------------------------------------------------- returns
def original_loop_returns(kl, reward, mask, start, gamma, clip):
    """The original's backward loop over the answer (c <- c·γ; returns = kl + c), in float32."""
    returns = torch.zeros_like(kl)
    ratios = []
    for b in range(kl.size(0)):
        answer_len = int(mask[b, start:].sum())
        c = reward[b].clamp(-clip, clip)
        for j in range(start + answer_len - 1, start - 1, -1):
            c = c * gamma
            returns[b, j] = kl[b, j] + c
            ratios.append(kl[b, j].abs() / (c.abs() + kl[b, j].abs() + 1e-6))
    return returns, float(sum(ratios) / len(ratios))


def test_compute_returns_hand_example():
    # L = 8, prompt_len P = 3, start = 2; columns are actions seq[:, 1:].
    # row 0: [pad | p p | a a a a eos]   left-padded prompt, 5 answer tokens (T=5), reward 7 -> clipped 5
    # row 1: [p p p | a eos pad pad pad] 2 answer tokens (T=2), masked tail, reward -1.5
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1],
                              [1, 1, 1, 1, 1, 0, 0, 0]])
    mask = attention[:, 1:]
    kl = torch.tensor([[9.0, 9.0, 0.125, -0.25, 0.375, 0.0, -0.5],
                       [9.0, 9.0, 0.25, -0.25, 9.0, 9.0, 9.0]])
    reward = torch.tensor([7.0, -1.5])
    returns, kl_ratio = compute_returns(kl, reward, mask, start=2, gamma=0.5, clip_reward_value=5.0)
    # row 0: 5·(1/32, 1/16, 1/8, 1/4, 1/2) = (.15625, .3125, .625, 1.25, 2.5) added to kl
    # row 1: -1.5·(1/4, 1/2) = (-.375, -.75) added to kl
    expected = torch.tensor([[0.0, 0.0, 0.28125, 0.0625, 1.0, 1.25, 2.0],
                             [0.0, 0.0, -0.125, -1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(returns, expected)
    assert returns.dtype == torch.float32
    # |kl| / (|kl| + |discounted reward|) over the 7 visited tokens
    hand = (0.125 / 0.28125 + 0.25 / 0.5625 + 0.375 / 1.0 + 0.0 + 0.5 / 3.0 + 0.25 / 0.625 + 0.25 / 1.0) / 7
    assert kl_ratio == pytest.approx(hand, rel=1e-5)
    assert isinstance(kl_ratio, float)


def test_compute_returns_matches_original_loop_on_random_inputs():
    torch.manual_seed(1)
    B, width, start = 6, 20, 4
    kl = torch.randn(B, width) * 0.3
    reward = torch.randn(B) * 4  # some beyond the clip
    # contiguous answers of varied length (0 .. all columns) plus random masks with holes
    answer_len = torch.tensor([0, 1, 3, 9, width - start, 7])
    mask = (torch.arange(width) < start + answer_len[:, None]).long()
    holes = (torch.rand(B, width) < 0.6).long()
    for m in (mask, holes):
        returns, kl_ratio = compute_returns(kl, reward, m, start, gamma=0.9, clip_reward_value=5.0)
        expected, expected_ratio = original_loop_returns(kl, reward, m, start, 0.9, 5.0)
        torch.testing.assert_close(returns, expected)
        assert kl_ratio == pytest.approx(expected_ratio, rel=1e-5)


def test_compute_returns_in_float32_for_bf16_inputs_and_empty_answers():
    kl = torch.tensor([[0.0, 0.1, -0.2, 0.3]]).bfloat16()
    mask = torch.tensor([[1, 1, 1, 1]])
    returns, _ = compute_returns(kl, torch.tensor([1.3]).bfloat16(), mask, 1, 0.99, 5.0)
    expected, _ = compute_returns(kl.float(), torch.tensor([1.3]).bfloat16().float(), mask, 1, 0.99, 5.0)
    assert returns.dtype == torch.float32
    torch.testing.assert_close(returns, expected, rtol=0, atol=0)
    empty, ratio = compute_returns(kl, torch.tensor([1.0]), torch.zeros(1, 4, dtype=torch.long), 1, 0.99, 5.0)
    assert ratio == 0.0 and not empty.any()


# ---------------------------------------------------------------------------------------------- loss
def test_policy_gradient_loss_hand_value_and_constant_returns():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 2.0, -1.0], [0.5, 3.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    loss = policy_gradient_loss(logprobs, returns, mask)
    # (1·1 + 2·2 + 0.5·1 + 2·3) / 4 = 11.5 / 4
    assert loss.item() == pytest.approx(2.875)
    loss.backward()
    assert returns.grad is None
    torch.testing.assert_close(logprobs.grad, -returns.detach() * mask / 4)


@pytest.mark.parametrize("ret, direction", [(1.0, 1), (-1.0, -1)])
def test_policy_gradient_step_moves_sampled_token_log_prob_with_return_sign(ret, direction):
    theta = torch.zeros(4, requires_grad=True)          # logits of a 4-token vocabulary
    token = torch.tensor([[2]])
    optimizer = torch.optim.SGD([theta], lr=0.5)

    def logprob():
        return gather_log_probs(theta[None, None, :], token)

    before = logprob().item()
    loss = policy_gradient_loss(logprob(), torch.tensor([[ret]]), torch.ones(1, 1))
    loss.backward()
    optimizer.step()
    assert direction * (logprob().item() - before) > 1e-3


# ---------------------------------------------------------------------------------------------- masks
def test_action_mask_keeps_exactly_the_first_eos():
    # prompt_len = 3
    seq = torch.tensor([
        [PAD, PAD, 5, 7, PAD, PAD, PAD],   # left pad + BOS (= pad id) in the prompt; eos then pads
        [4, 5, 6, 7, 8, 9, 10],             # no eos: ran to the cap
        [4, 5, 6, PAD, PAD, PAD, PAD],      # eos at the first answer position
        [4, 5, 6, 7, 8, PAD, PAD],          # eos in the middle
    ])
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ])
    mask = action_mask_from_sequences(seq, prompt_len=3, pad_token_id=PAD)
    assert mask.dtype == torch.long
    assert torch.equal(mask, expected)


def test_fix_degenerate_answers_patches_rows_with_at_most_one_token():
    space = 99
    seq = torch.tensor([
        [4, 5, PAD, PAD, PAD],   # 0 answer tokens
        [4, 5, 7, PAD, PAD],     # 1 answer token (genuine, still patched like the original)
        [4, 5, 7, 8, PAD],       # 2 answer tokens
        [PAD, 5, 7, 8, PAD],     # prompt pad ids do not count
    ])
    original = seq.clone()
    patched, rows = fix_degenerate_answers(seq, prompt_len=2, pad_token_id=PAD, replacement_token_id=space)
    assert torch.equal(rows, torch.tensor([True, True, False, False]))
    assert torch.equal(patched, torch.tensor([
        [4, 5, space, PAD, PAD],
        [4, 5, space, PAD, PAD],
        [4, 5, 7, 8, PAD],
        [PAD, 5, 7, 8, PAD],
    ]))
    assert torch.equal(seq, original)


# ---------------------------------------------------------------------------------------------- metrics
def test_entropy_and_full_kl_hand_values():
    uniform = torch.zeros(4)
    one_hot = torch.tensor([0.0, -float("inf"), -float("inf"), -float("inf")])
    actor = torch.stack([uniform, one_hot, one_hot])[None]      # [1, 3, 4]
    ref = torch.stack([uniform, uniform, one_hot])[None]
    entropy, full_kl = entropy_and_full_kl_from_logits(actor, ref)
    torch.testing.assert_close(entropy, torch.tensor([[math.log(4), 0.0, 0.0]]))
    # KL(uniform‖uniform) = 0, KL(one-hot‖uniform) = log 4, KL(one-hot‖one-hot) = 0
    torch.testing.assert_close(full_kl, torch.tensor([[0.0, math.log(4), 0.0]]))


def test_full_kl_of_identical_logits_is_zero_and_chunking_changes_nothing():
    torch.manual_seed(2)
    actor, ref = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    _, same = entropy_and_full_kl_from_logits(actor, actor)
    torch.testing.assert_close(same, torch.zeros(2, 5))
    entropy, full_kl = entropy_and_full_kl_from_logits(actor, ref)
    assert (full_kl > 0).all()
    chunked = entropy_and_full_kl_from_logits(actor, ref, chunk_size=2)
    torch.testing.assert_close(chunked[0], entropy)
    torch.testing.assert_close(chunked[1], full_kl)


def test_logging_reductions():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    # columns 1.. : (2 + 3 + 6 + 7 + 8) / 5
    assert masked_mean_from(values, mask, start=1).item() == pytest.approx(5.2)
    assert masked_max_from(values, mask, start=1).item() == 8.0
    action_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    # true lengths from prompt_len = 2 (the original, summing from P - 1, reported 4 and 3)
    assert torch.equal(answer_lengths(action_mask, prompt_len=2), torch.tensor([3.0, 2.0]))


def test_truncated_rate():
    seq = torch.tensor([
        [4, 5, 7, PAD, PAD],   # stopped
        [PAD, 5, 7, 8, 9],     # no eos in the answer (the prompt's pad id does not count)
        [4, 5, PAD, PAD, PAD], # stopped at once
    ])
    assert truncated_rate(seq, prompt_len=2, pad_token_id=PAD).item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- chunked LM head
def _full_scores(actor_hidden, ref_hidden, head, ref_head, labels):
    logits, ref_logits = head(actor_hidden), ref_head(ref_hidden)
    entropy, full_kl = entropy_and_full_kl_from_logits(logits.detach(), ref_logits)
    return {"logprobs": gather_log_probs(logits[:, :-1], labels),
            "ref_logprobs": gather_log_probs(ref_logits[:, :-1], labels),
            "entropy": entropy, "full_kl": full_kl}


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 7])
def test_chunked_answer_scores_equal_the_full_logits_gradients_included(chunks):
    """Every number of chunks (all at once, uneven, one position each, more chunks than positions)
    gives the log-probs, metrics and gradients of the computation over full [B, N, V] logits."""
    torch.manual_seed(3)
    B, N, H, V = 2, 5, 4, 11
    head, ref_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    hidden = torch.randn(B, N, H, requires_grad=True)
    ref_hidden = torch.randn(B, N, H)
    labels = torch.randint(0, V, (B, N - 1))
    weights = torch.randn(B, N - 1)  # a loss that weighs every log-prob differently

    expected = _full_scores(hidden, ref_hidden, head, ref_head, labels)
    (expected["logprobs"] * weights).sum().backward()
    grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None

    calls = []
    counted_head = lambda h: (calls.append(h.size(1)), head(h))[1]  # noqa: E731
    got = chunked_answer_scores(hidden, counted_head, labels, chunks, ref_hidden, ref_head)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape and got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert got["entropy"].grad_fn is None and got["ref_logprobs"].grad_fn is None
    forward_calls = len(calls)
    assert calls == [-(-N // chunks)] * chunks  # exactly `chunks` calls of equal size, padded
    (got["logprobs"] * weights).sum().backward()
    # Several chunks: each one's logits were recomputed, not kept; one chunk: kept.
    assert len(calls) == forward_calls * (2 if chunks > 1 else 1)
    for grad, t in zip(grads, (hidden, head.weight, head.bias)):
        torch.testing.assert_close(t.grad, grad, rtol=1e-5, atol=1e-6)


def test_chunked_answer_scores_without_reference_and_without_grad():
    torch.manual_seed(4)
    head = torch.nn.Linear(3, 6)
    hidden, labels = torch.randn(2, 4, 3), torch.randint(0, 6, (2, 3))
    with torch.no_grad():
        got = chunked_answer_scores(hidden, head, labels, 2)
        expected = gather_log_probs(head(hidden)[:, :-1], labels)
    assert set(got) == {"logprobs"}
    torch.testing.assert_close(got["logprobs"], expected)
    # Hand value: one position, two logits [0, log 3] -> log π(token 1) = log(3/4).
    two = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        two.weight.copy_(torch.tensor([[0.0], [math.log(3)]]))
        out = chunked_answer_scores(torch.ones(1, 2, 1), two, torch.tensor([[1]]), 1)
    torch.testing.assert_close(out["logprobs"], torch.tensor([[math.log(0.75)]]))
