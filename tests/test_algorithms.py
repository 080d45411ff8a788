"""Unit tests of the stage-3 algorithms (algorithms.py), with values that can be checked on paper.

Every expected number is written out by hand next to its derivation; nothing is computed by the
function under test or a copy of it.
"""
import math

import pytest
import torch

from algorithms import (ALGORITHMS, ESTIMATORS, POLICY_LOSSES, Advantages, AlgorithmSettings,
                        AnswerBatch, clipped_surrogate, clipped_value_loss, compute_returns,
                        gae_advantages, gae_advantages_and_returns, grpo_advantages, grpo_loss,
                        last_action_one_hot, leave_one_out_baseline, ppo_clip_loss,
                        remax_advantages, rloo_advantages)

LN2 = math.log(2.0)


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float32)


def answers(mask, reward, logprobs=None, ref_logprobs=None, **extra):
    """An AnswerBatch; log-probs default to 0 (π_old = π_ref, so no KL penalty)."""
    mask = torch.tensor(mask)
    logprobs = torch.zeros(mask.shape) if logprobs is None else tensor(logprobs)
    ref_logprobs = logprobs.clone() if ref_logprobs is None else tensor(ref_logprobs)
    return AnswerBatch(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask,
                       reward=tensor(reward), **extra)


def logprobs_with_ratios(old, ratios):
    """New log-probs (leaf, with grad) such that exp(new - old) = ratios."""
    return (tensor(old) + torch.log(tensor(ratios))).detach().requires_grad_(True)


# ------------------------------------------------------------------------------------------------ GAE
def test_gae_recursion_hand_values_with_masked_tail():
    # γ = 0.9, λ = 0.8, so γλ = 0.72; V(s_T) = 0 after each answer's last action.
    rewards = tensor([[0.1, 0.0, -0.2, 1.0],
                      [0.0, 2.0, 7.0, 7.0]])     # row 1: columns 2, 3 are past the end
    values = tensor([[0.5, 0.4, 0.3, 0.2],
                     [1.0, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1],
                         [1, 1, 0, 0]])
    advantages, returns = gae_advantages_and_returns(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0:
    #   t=3: δ = 1.0 + 0.9·0   - 0.2 =  0.8            A3 = 0.8
    #   t=2: δ = -0.2 + 0.9·0.2 - 0.3 = -0.32          A2 = -0.32 + 0.72·0.8     = 0.256
    #   t=1: δ = 0.0 + 0.9·0.3 - 0.4 = -0.13           A1 = -0.13 + 0.72·0.256   = 0.05432
    #   t=0: δ = 0.1 + 0.9·0.4 - 0.5 = -0.04           A0 = -0.04 + 0.72·0.05432 = -0.0008896
    # row 1 (the 7s and 9s are ignored; V(s_2) = 0):
    #   t=1: δ = 2.0 + 0.9·0   - 0.5 =  1.5            A1 = 1.5
    #   t=0: δ = 0.0 + 0.9·0.5 - 1.0 = -0.55           A0 = -0.55 + 0.72·1.5 = 0.53
    expected_advantages = tensor([[-0.0008896, 0.05432, 0.256, 0.8],
                                  [0.53, 1.5, 0.0, 0.0]])
    # R = A + V on real actions, 0 past the end
    expected_returns = tensor([[0.4991104, 0.45432, 0.556, 1.0],
                               [1.53, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)
    assert (advantages[1, 2:] == 0).all() and (returns[1, 2:] == 0).all()


# ------------------------------------------------------------------------------------- gae estimator
def test_last_action_one_hot_including_an_empty_row():
    mask = torch.tensor([[1, 1, 1, 1],
                         [1, 1, 1, 0],
                         [0, 0, 0, 0],
                         [1, 0, 0, 0]])
    expected = tensor([[0, 0, 0, 1],      # T = 4 -> column 3
                       [0, 0, 1, 0],      # T = 3 -> column 2
                       [0, 0, 0, 0],      # T = 0 -> no last action
                       [1, 0, 0, 0]])     # T = 1 -> column 0
    out = last_action_one_hot(mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gae_estimator_puts_clipped_score_on_last_real_action():
    # γ = λ = 1 and V = 0, so A_t = R_t = Σ_{s>=t} r_s: every column of the score shows.
    cfg = AlgorithmSettings(gamma=1.0, lam=1.0, kl_ctl=0.5, clip_reward_value=5.0)
    ref = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    logprobs = [[0.2, -0.4, 0.0, 0.6],        # -0.5·(logπ - ref) = [-0.1, 0.2, 0.0, -0.3]
                [0.0, 0.2, -0.2, 0.8]]        # -0.5·(logπ - ref) = [ 0.0, -0.1, 0.1, (masked)]
    batch = answers([[1, 1, 1, 1], [1, 1, 1, 0]], reward=[9.0, -2.0], logprobs=logprobs,
                    ref_logprobs=ref, values=torch.zeros(2, 4))
    out = gae_advantages(batch, cfg)
    # row 0: T = 4, score 9 clipped to 5 at column 3: r = [-0.1, 0.2, 0.0, -0.3 + 5 = 4.7]
    #        suffix sums: [4.8, 4.9, 4.7, 4.7]
    # row 1: T = 3, score -2 at column 2 (not 3):    r = [0.0, -0.1, 0.1 - 2 = -1.9, 0]
    #        suffix sums: [-2.0, -2.0, -1.9, 0]
    expected = tensor([[4.8, 4.9, 4.7, 4.7],
                       [-2.0, -2.0, -1.9, 0.0]])
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.returns, expected)   # R = A + V, V = 0


def test_gae_estimator_uses_gamma_lambda_and_values():
    # One answer, T = 2, no KL, score 1 at column 1; V = [0.5, 0.25]; γ = 0.5, λ = 0.8 (γλ = 0.4).
    cfg = AlgorithmSettings(gamma=0.5, lam=0.8, clip_reward_value=5.0)
    batch = answers([[1, 1]], reward=[1.0], values=tensor([[0.5, 0.25]]))
    out = gae_advantages(batch, cfg)
    # t=1: δ = 1 + 0.5·0 - 0.25 = 0.75                A1 = 0.75
    # t=0: δ = 0 + 0.5·0.25 - 0.5 = -0.375            A0 = -0.375 + 0.4·0.75 = -0.075
    # (γ and λ swapped would give A0 = -0.3 + 0.4·0.75 = 0)
    torch.testing.assert_close(out.advantages, tensor([[-0.075, 0.75]]))
    torch.testing.assert_close(out.returns, tensor([[-0.075 + 0.5, 0.75 + 0.25]]))
    assert out.stats["advantage"] == pytest.approx((-0.075 + 0.75) / 2)
    assert out.stats["value"] == pytest.approx((0.5 + 0.25) / 2)


def test_gae_estimator_needs_values():
    with pytest.raises(ValueError, match="values"):
        gae_advantages(answers([[1, 1]], reward=[1.0]), AlgorithmSettings())


# --------------------------------------------------------------------------------- PPO policy loss
# ε = 0.2. Tokens (ratio ρ, advantage A) -> max(-A·ρ, -A·clip(ρ, 0.8, 1.2)):
#   (1.1, +1): inside the range            -> -1.1                       unclipped
#   (1.5, +2): max(-3.0, -2·1.2 = -2.4)    -> -2.4                       clip binds
#   (0.5, -1): max( 0.5,  1·0.8 =  0.8)    ->  0.8                       clip binds
#   (0.5, +1): max(-0.5, -0.8)             -> -0.5                       clip does not bind
#   (1.5, -1): max( 1.5,  1.2)             ->  1.5                       clip does not bind
#   masked (ρ would be 3, A = 4): ρ is set to 1 -> -4·1 = -4             not counted
PPO_OLD = [[-1.0, -2.0, -0.5], [-1.5, -0.7, -1.2]]
PPO_RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]]
PPO_ADVANTAGES = [[1.0, 2.0, -1.0], [1.0, -1.0, 4.0]]
PPO_MASK = [[1, 1, 1], [1, 1, 0]]


def test_clipped_surrogate_per_token_values_and_clip_fraction():
    logprobs = logprobs_with_ratios(PPO_OLD, PPO_RATIOS)
    per_token, clip_frac = clipped_surrogate(logprobs, tensor(PPO_OLD), tensor(PPO_ADVANTAGES),
                                             torch.tensor(PPO_MASK), cliprange=0.2)
    torch.testing.assert_close(per_token.detach(), tensor([[-1.1, -2.4, 0.8],
                                                           [-0.5, 1.5, -4.0]]))
    assert clip_frac == pytest.approx(2 / 5)   # the clip binds on 2 of the 5 real tokens


def test_ppo_clip_loss_token_mean_and_gradient_directions():
    logprobs = logprobs_with_ratios(PPO_OLD, PPO_RATIOS)
    batch = answers(PPO_MASK, reward=[0.0, 0.0], logprobs=PPO_OLD)
    loss, stats = ppo_clip_loss(logprobs, batch, Advantages(tensor(PPO_ADVANTAGES)),
                                AlgorithmSettings(cliprange=0.2))
    # (-1.1 - 2.4 + 0.8 - 0.5 + 1.5) / 5 real tokens
    assert loss.item() == pytest.approx(-1.7 / 5)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    loss.backward()
    # unclipped: d(-A·ρ)/d logπ = -A·ρ, over 5 tokens; 0 where the clip binds and where masked
    expected_grad = tensor([[-1.0 * 1.1 / 5, 0.0, 0.0],
                            [-1.0 * 0.5 / 5, 1.0 * 1.5 / 5, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad)
    # a gradient-descent step raises log π where A > 0, lowers it where A < 0, and leaves it where
    # the clip binds (or the token is masked)
    step = -0.1 * logprobs.grad
    assert step[0, 0] > 0 and step[1, 0] > 0     # A = +1
    assert step[1, 1] < 0                        # A = -1, ratio 1.5 (clip does not bind)
    assert step[0, 1] == 0 and step[0, 2] == 0 and step[1, 2] == 0


# -------------------------------------------------------------------------------------- value loss
def test_clipped_value_loss_hand_value_and_gradient():
    # old V = 0.5, ε_v = 0.2 -> V_clip = clamp(V, 0.3, 0.7)
    values = tensor([[0.6, 1.0, 1.0],
                     [0.0, 5.0, 0.0]]).requires_grad_(True)
    old_values = torch.full((2, 3), 0.5)
    returns = tensor([[1.0, 0.0, 1.2],
                      [0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # (0,0) V=0.6 inside:   (0.6-1.0)² = 0.16
    # (0,1) V=1.0 -> 0.7:   max((1.0-0)², (0.7-0)²)     = max(1.0, 0.49) = 1.0    unclipped
    # (0,2) V=1.0 -> 0.7:   max((1.0-1.2)², (0.7-1.2)²) = max(0.04, 0.25) = 0.25  clipped
    # (1,0) V=0.0 -> 0.3:   max((0-0.2)², (0.3-0.2)²)   = max(0.04, 0.01) = 0.04  unclipped
    # masked (1,1), (1,2) ignored; 0.5 · (0.16 + 1.0 + 0.25 + 0.04) / 4
    assert loss.item() == pytest.approx(0.5 * 1.45 / 4)
    loss.backward()
    # d/dV 0.5·(V - R)² / 4 = (V - R) / 4 on the unclipped branch; 0 on the clipped one (V_clip is
    # constant in V outside the range) and on masked tokens
    expected_grad = tensor([[(0.6 - 1.0) / 4, (1.0 - 0.0) / 4, 0.0],
                            [(0.0 - 0.2) / 4, 0.0, 0.0]])
    torch.testing.assert_close(values.grad, expected_grad)


# --------------------------------------------------------------------------------------------- RLOO
def test_leave_one_out_baseline_k2_and_k3():
    # k = 2: each sample's baseline is the other sample's reward
    torch.testing.assert_close(leave_one_out_baseline(tensor([1.0, 3.0, -2.0, 4.0]), 2),
                               tensor([3.0, 1.0, 4.0, -2.0]))
    # k = 3, group [1, 2, 6]: (2+6)/2, (1+6)/2, (1+2)/2
    torch.testing.assert_close(leave_one_out_baseline(tensor([1.0, 2.0, 6.0]), 3),
                               tensor([4.0, 3.5, 1.5]))


def test_leave_one_out_baseline_errors():
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 2"):
        leave_one_out_baseline(tensor([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(answers([[1], [1]], reward=[1.0, 2.0]), AlgorithmSettings(group_size=1))


def rloo_batch():
    # k = 2, one prompt: rewards [1, 3] -> LOO baselines [3, 1] -> r - b = [-2, 2]
    return answers([[1, 1], [1, 0]], reward=[1.0, 3.0],
                   logprobs=[[0.2, -0.4], [0.6, 0.8]], ref_logprobs=[[0.0, 0.0], [0.0, 0.0]])


RLOO_CFG = AlgorithmSettings(gamma=0.5, kl_ctl=0.5, clip_reward_value=5.0, group_size=2)


def test_rloo_estimator_k2_hand_values_match_compute_returns():
    out = rloo_advantages(rloo_batch(), RLOO_CFG)
    # KL penalty -0.5·(logπ - ref) = [[-0.1, 0.2], [-0.3, (masked)]]
    # row 0 (T=2): -2·[γ², γ] = [-0.5, -1.0];  row 1 (T=1): 2·γ = 1.0
    expected = tensor([[-0.1 - 0.5, 0.2 - 1.0],
                       [-0.3 + 1.0, 0.0]])
    torch.testing.assert_close(out.advantages, expected)
    assert out.returns is None
    # the same as ReMax's compute_returns fed r_i - mean_{j≠i} r_j
    penalty = tensor([[-0.1, 0.2], [-0.3, -0.4]])
    by_compute_returns, _ = compute_returns(penalty, tensor([-2.0, 2.0]), torch.tensor([[1, 1], [1, 0]]),
                                            0, 0.5, 5.0)
    torch.testing.assert_close(out.advantages, by_compute_returns)
    assert out.stats["advantage"] == pytest.approx(0.0)            # mean of [-2, 2]
    assert out.stats["baseline_reward"] == pytest.approx(2.0)      # mean of [3, 1]


def test_rloo_is_remax_with_the_leave_one_out_baseline():
    batch = rloo_batch()
    batch.baseline_reward = tensor([3.0, 1.0])      # the LOO baselines, by hand
    remax = remax_advantages(batch, RLOO_CFG)
    rloo = rloo_advantages(rloo_batch(), RLOO_CFG)
    torch.testing.assert_close(rloo.advantages, remax.advantages, rtol=0, atol=0)
    assert rloo.stats == pytest.approx(remax.stats)


def test_rloo_estimator_k3_with_clip():
    # group [1, 2, 6]: b = [4, 3.5, 1.5], r - b = [-3, -1.5, 4.5]; clip ±4 -> [-3, -1.5, 4]
    cfg = AlgorithmSettings(gamma=0.5, clip_reward_value=4.0, group_size=3)
    out = rloo_advantages(answers([[1], [1], [1]], reward=[1.0, 2.0, 6.0]), cfg)
    # T = 1: γ¹ · clip(r - b)
    torch.testing.assert_close(out.advantages, tensor([[-1.5], [-0.75], [2.0]]))


# --------------------------------------------------------------------------------------------- GRPO
def test_grpo_advantages_sample_std_equal_group_and_unclipped_rewards():
    cfg = AlgorithmSettings(group_size=3, clip_reward_value=5.0)
    mask = [[1, 1, 1], [1, 1, 0], [1, 0, 0],
            [1, 1, 1], [1, 1, 0], [1, 0, 0],
            [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    rewards = [0.0, 3.0, 6.0,        # mean 3, deviations ±3, 0: sample var 18/2 = 9, std 3
               2.0, 2.0, 2.0,        # all equal: std 0 -> advantage 0 / 1e-4 = 0
               100.0, 0.0, 50.0]     # not clipped to ±5: mean 50, sample var 5000/2 = 2500, std 50
    out = grpo_advantages(answers(mask, reward=rewards), cfg)
    a = 3.0 / (3.0 + 1e-4)           # (the population std √6 would give 3/2.449 = 1.22)
    c = 50.0 / (50.0 + 1e-4)
    expected = tensor([[-a, -a, -a], [0.0, 0.0, 0.0], [a, 0.0, 0.0],
                       [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                       [c, c, c], [-c, -c, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out.advantages, expected)
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[3:6] == 0).all()                       # exactly 0, not tiny
    assert out.returns is None
    assert out.stats["baseline_reward"] == pytest.approx((3.0 + 2.0 + 50.0) / 3)


def test_grpo_advantages_need_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(answers([[1]], reward=[1.0]), AlgorithmSettings(group_size=1))


def test_grpo_loss_is_a_mean_of_per_answer_means_at_ratio_one():
    # ppo_epochs 1: logπ = logπ_old, so ρ = 1, per-token loss -A, and the clip never acts.
    old = [[-1.0, -1.0, -1.0], [-2.0, -0.5, -1.5]]
    logprobs = tensor(old).requires_grad_(True)
    batch = answers([[1, 0, 0], [1, 1, 1]], reward=[0.0, 0.0], logprobs=old)   # ref = old: KL 0
    advantages = tensor([[2.0, 7.0, 7.0],        # the 7s are past row 0's end
                         [-1.0, -1.0, -1.0]])
    loss, stats = grpo_loss(logprobs, batch, Advantages(advantages),
                            AlgorithmSettings(cliprange=0.2, kl_loss_coef=0.1))
    # per answer: row 0 -2/1 = -2, row 1 (1+1+1)/3 = 1; mean over answers (-2 + 1)/2 = -0.5
    # (a token mean would be (-2 + 3)/4 = 0.25)
    assert loss.item() == pytest.approx(-0.5)
    assert stats["clip_frac"] == 0.0
    assert stats["kl_loss"] == pytest.approx(0.0)
    loss.backward()
    # d(-A·ρ)/d logπ = -A at ρ = 1, divided by T_b and by the 2 answers
    torch.testing.assert_close(logprobs.grad, tensor([[-2.0 / 1 / 2, 0.0, 0.0],
                                                      [1.0 / 3 / 2, 1.0 / 3 / 2, 1.0 / 3 / 2]]))


def test_grpo_loss_k3_kl_term_and_its_gradient_toward_ref():
    # A = 0 and ρ = 1, so only kl_loss_coef · k3 remains. d = ref - logπ:
    #   d = ln2:  k3 = 2 - ln2 - 1 = 1 - ln2,   d k3/d logπ = 1 - e^d = -1   (logπ below ref)
    #   d = 0:    k3 = 0,                       gradient 0
    #   d = -ln2: k3 = 1/2 + ln2 - 1 = ln2 - 1/2, gradient 1 - 1/2 = 1/2      (logπ above ref)
    old = [[-1.0, -1.0], [-2.0, -2.0]]
    logprobs = tensor(old).requires_grad_(True)
    ref = [[-1.0 + LN2, -1.0], [-2.0 - LN2, 0.0]]        # row 1 column 1 is masked
    batch = answers([[1, 1], [1, 0]], reward=[0.0, 0.0], logprobs=old, ref_logprobs=ref)
    loss, stats = grpo_loss(logprobs, batch, Advantages(torch.zeros(2, 2)),
                            AlgorithmSettings(kl_loss_coef=0.1))
    kl_row0 = (1 - LN2 + 0.0) / 2
    kl_row1 = (LN2 - 0.5) / 1
    assert loss.item() == pytest.approx(0.1 * (kl_row0 + kl_row1) / 2)
    assert stats["kl_loss"] == pytest.approx((kl_row0 + kl_row1) / 2)
    loss.backward()
    # 0.1 · (1 - e^d) / T_b / 2 answers
    torch.testing.assert_close(logprobs.grad, tensor([[0.1 * -1.0 / 2 / 2, 0.0],
                                                      [0.1 * 0.5 / 1 / 2, 0.0]]))
    # descent raises logπ where it is below ref and lowers it where it is above
    assert logprobs.grad[0, 0] < 0 < logprobs.grad[1, 0]


def test_grpo_loss_ignores_masked_tokens_even_when_k3_overflows_there():
    # Row 0, column 1 is past the end; there ref - logπ = 100, exp(100) is inf in float32.
    old = [[-1.0, -100.0]]
    logprobs = tensor(old).requires_grad_(True)
    batch = answers([[1, 0]], reward=[0.0], logprobs=old, ref_logprobs=[[-1.0, 0.0]])
    loss, _ = grpo_loss(logprobs, batch, Advantages(tensor([[1.0, 1.0]])),
                        AlgorithmSettings(kl_loss_coef=0.1))
    # only column 0 counts: -A·ρ = -1, k3 = 0
    assert loss.item() == pytest.approx(-1.0)


# -------------------------------------------------------------------------------------------- ReMax
def test_remax_needs_the_greedy_reward():
    with pytest.raises(ValueError, match="baseline_reward"):
        remax_advantages(answers([[1]], reward=[1.0]), AlgorithmSettings())


def test_remax_hand_values_and_stats():
    # r - b = [2 - 0.5, -1 - 1] = [1.5, -2]; no KL; γ = 0.5
    batch = answers([[1, 1], [1, 0]], reward=[2.0, -1.0], baseline_reward=tensor([0.5, 1.0]))
    out = remax_advantages(batch, AlgorithmSettings(gamma=0.5, clip_reward_value=5.0))
    # row 0 (T=2): 1.5·[γ², γ] = [0.375, 0.75];  row 1 (T=1): -2·γ = -1
    torch.testing.assert_close(out.advantages, tensor([[0.375, 0.75], [-1.0, 0.0]]))
    assert out.stats["advantage"] == pytest.approx((1.5 - 2.0) / 2)
    assert out.stats["baseline_reward"] == pytest.approx((0.5 + 1.0) / 2)
    assert out.stats["kl_ratio"] == 0.0


# -------------------------------------------------------------------------------------------- table
def test_every_algorithm_names_registered_functions():
    assert set(ALGORITHMS) == {"remax", "ppo", "rloo", "grpo"}
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.estimator in ESTIMATORS, name
        assert algorithm.loss in POLICY_LOSSES, name
        assert 1 <= algorithm.rollout.min_samples <= algorithm.rollout.samples, name


def test_algorithm_table_entries():
    remax, ppo, rloo, grpo = (ALGORITHMS[n] for n in ("remax", "ppo", "rloo", "grpo"))
    assert remax.rollout.greedy_baseline and not remax.critic
    assert remax.estimator == "remax" and remax.loss == "reinforce"
    assert ppo.critic and not ppo.rollout.greedy_baseline
    assert ppo.estimator == "gae" and ppo.loss == "ppo_clip"
    assert [name for name, a in ALGORITHMS.items() if a.critic] == ["ppo"]
    assert rloo.rollout.min_samples == 2 and grpo.rollout.min_samples == 2
    assert rloo.estimator == "rloo" and grpo.estimator == "grpo" and grpo.loss == "grpo"
    assert remax.gamma == 0.95 and ppo.gamma == 1.0


def test_algorithm_dispatches_to_its_estimator_and_loss():
    # ALGORITHMS["rloo"] gives the hand values of test_rloo_estimator_k2_hand_values_match_compute_returns
    adv = ALGORITHMS["rloo"].estimate(rloo_batch(), RLOO_CFG)
    torch.testing.assert_close(adv.advantages, tensor([[-0.6, -0.8], [0.7, 0.0]]))
    logprobs = tensor([[-1.0, -2.0], [-0.5, -3.0]])
    loss, _ = ALGORITHMS["rloo"].policy_loss(logprobs, rloo_batch(), adv, RLOO_CFG)
    # REINFORCE: -Σ w·logπ·mask / 3 = -(0.6·1 + 0.8·2 - 0.7·0.5) / 3
    assert loss.item() == pytest.approx(-(0.6 + 1.6 - 0.35) / 3)
