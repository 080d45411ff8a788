"""The stage-3 algorithms as pure functions on answer-only tensors, and the table that names them.

Every tensor here is answer-only: [B, T], column t is the t-th answer action (EOS included), rows
prompt-major (the k samples of prompt i are rows i·k … i·k + k - 1). `mask` [B, T] marks real actions
(1s then 0s); T_b = Σ_t mask[b, t] is answer b's length. An algorithm is

    an advantage estimator  (AnswerBatch, AlgorithmSettings) -> Advantages   (what each token is worth)
    a policy loss           (new log-probs, AnswerBatch, Advantages, settings) -> (loss, stats)
    a rollout               how many answers per prompt, and whether a greedy one is decoded too
    a critic or not         PPO's value model, trained with `clipped_value_loss`

and ALGORITHMS maps each `--algo` to those. The trainer never asks which algorithm it runs.
Adding one is a pure function, a table entry and a hand-checked test.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from rl_math import k3_kl, kl_penalty, masked_mean


@dataclass(frozen=True)
class AlgorithmSettings:
    """The hyper-parameters the estimators and losses read (from the stage-3 flags)."""
    gamma: float = 0.95             # discount of the score (ReMax, RLOO) / of GAE (PPO)
    lam: float = 0.95               # GAE λ
    kl_ctl: float = 0.1             # β of the per-token KL penalty in the reward
    clip_reward_value: float = 5.0  # the score (or score - baseline) is clipped to ±this
    cliprange: float = 0.2          # PPO / GRPO ratio clip ε
    cliprange_value: float = 0.2    # PPO value clip
    kl_loss_coef: float = 0.04      # GRPO's KL-to-reference loss coefficient
    group_size: int = 1             # k answers sampled per prompt


@dataclass
class AnswerBatch:
    """What an estimator or loss may read, answer-only. Tensors [B, T] unless noted."""
    logprobs: torch.Tensor                         # log π_old(a_t) at generation time
    ref_logprobs: torch.Tensor                     # log π_ref(a_t)
    mask: torch.Tensor                             # 1 on real actions
    reward: torch.Tensor                           # [B] score of each sampled answer
    baseline_reward: Optional[torch.Tensor] = None  # [B] score of the prompt's greedy answer
    values: Optional[torch.Tensor] = None          # critic's V(s_t) at generation time


@dataclass
class Advantages:
    """An estimator's output: per-token weights of the policy loss, and for a critic its targets."""
    advantages: torch.Tensor                 # [B, T], 0 past each answer's end
    returns: Optional[torch.Tensor] = None   # [B, T] value targets (critic algorithms only)
    stats: Dict[str, float] = field(default_factory=dict)


ESTIMATORS: Dict[str, Callable] = {}
POLICY_LOSSES: Dict[str, Callable] = {}


def advantage_estimator(name):
    def register(fn):
        ESTIMATORS[name] = fn
        return fn
    return register


def policy_loss(name):
    def register(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return register


# ------------------------------------------------------------------------------ shared pieces

@torch.no_grad()
def compute_returns(kl_penalty, reward, action_mask, start, gamma, clip_reward_value):
    """ReMax returns: the per-token weight w of the policy-gradient loss.

    kl_penalty:  [B, N] per-token -β·(log π_old - log π_ref)
    reward:      [B]    r(x, a) - b(x), baseline already subtracted, not yet clipped
    action_mask: [B, N]
    start:       column of the first answer action (0 for answer-only tensors, P - 1 for [B, L-1])

    With T_b = Σ_{j >= start} action_mask[b, j] (answer tokens incl. EOS) and end_b = start + T_b:
        returns[b, j] = kl_penalty[b, j] + γ^(end_b - j) · clip(reward_b, ±clip_reward_value)
    for start <= j < end_b (γ¹ on the last action, γ^T_b on the first), 0 elsewhere. Like the
    original, the answer region is the first T_b columns from start (the mask counts, its positions
    do not); in practice the answer mask is contiguous 1s then 0s, so the two agree.

    kl_ratio: mean over the visited (b, j) of |kl| / (|kl| + |discounted reward| + 1e-6), a Python
    float (0.0 when nothing is visited; the original divided by zero there).

    Returns (returns [B, N] float32, kl_ratio float).
    """
    # float32 whatever the model dtype: the original rounded the running reward to bf16/fp16.
    kl = kl_penalty.float()
    clipped = reward.float().clamp(-clip_reward_value, clip_reward_value)          # clip(r - b)
    answer_len = action_mask[:, start:].sum(dim=1)                                  # T_b
    end = start + answer_len                                                        # end_b
    cols = torch.arange(kl.size(1), device=kl.device)
    visited = (cols >= start) & (cols < end.unsqueeze(1))                           # [B, N]
    steps_to_end = (end.unsqueeze(1) - cols).clamp(min=0).float()                   # end_b - j
    discounted = clipped.unsqueeze(1) * torch.pow(torch.tensor(gamma, dtype=torch.float32,
                                                               device=kl.device), steps_to_end)
    discounted = torch.where(visited, discounted, torch.zeros_like(discounted))
    returns = torch.where(visited, kl + discounted, torch.zeros_like(kl))

    num_visited = int(visited.sum())
    if num_visited == 0:
        return returns, 0.0
    ratio = kl.abs() / (kl.abs() + discounted.abs() + 1e-6)
    kl_ratio = ratio[visited].sum().item() / num_visited
    return returns, kl_ratio


def group_view(values, group_size):
    """[B] -> [B / k, k]: the k samples of each prompt in one row (rows are prompt-major)."""
    if values.numel() % group_size:
        raise ValueError(f"{values.numel()} answers do not split into groups of {group_size}")
    return values.view(-1, group_size)


def leave_one_out_baseline(reward, group_size):
    """b_i = mean_{j ≠ i} r_j within each prompt's group of k >= 2 samples. [B] -> [B]."""
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    groups = group_view(reward.float(), group_size)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


def last_action_one_hot(mask):
    """1 at each row's last real action (column T_b - 1, the EOS when there is one). [B, T] -> [B, T]."""
    lengths = mask.sum(dim=1).long()
    one_hot = torch.zeros_like(mask, dtype=torch.float32)
    rows = torch.nonzero(lengths > 0).flatten()
    one_hot[rows, lengths[rows] - 1] = 1.0
    return one_hot


@torch.no_grad()
def gae_advantages_and_returns(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over the answer (DeepSpeed-Chat's recursion).

    rewards, values, mask: [B, T]. Rewards and values are zeroed past each answer's end, then, with
    V(s_T) = 0,
        δ_t = r_t + γ·V(s_{t+1}) - V(s_t),   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V(s_t).
    Returns (advantages [B, T], returns [B, T]), float32, 0 past each end.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# ------------------------------------------------------------------------------ estimators

def _discounted_with_baseline(batch, baseline, cfg):
    """ReMax's returns with any per-answer baseline b: KL penalty + γ-discounted clip(r - b)."""
    penalty = kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_ctl)
    score_advantage = batch.reward.float() - baseline.float()                # r(x, a) - b(x)
    returns, kl_ratio = compute_returns(penalty, score_advantage, batch.mask, 0, cfg.gamma,
                                        cfg.clip_reward_value)
    stats = {"advantage": score_advantage.mean().item(), "kl_ratio": kl_ratio,
             "baseline_reward": baseline.float().mean().item()}
    return Advantages(returns, None, stats)


@advantage_estimator("remax")
def remax_advantages(batch, cfg):
    """ReMax: the greedy answer's reward is the baseline, b(x) = r(x, ā)."""
    if batch.baseline_reward is None:
        raise ValueError("ReMax needs the greedy answers' rewards (baseline_reward)")
    return _discounted_with_baseline(batch, batch.baseline_reward, cfg)


@advantage_estimator("rloo")
def rloo_advantages(batch, cfg):
    """RLOO (Ahmadian et al. 2024) in this engine: ReMax's returns with the leave-one-out baseline
    b_i = mean_{j≠i} r_j of the prompt's k samples in place of the greedy reward."""
    return _discounted_with_baseline(batch, leave_one_out_baseline(batch.reward, cfg.group_size),
                                     cfg)


@advantage_estimator("grpo")
@torch.no_grad()
def grpo_advantages(batch, cfg):
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_group) / (std_group + 1e-4) on every answer token,
    std the sample standard deviation of the k unclipped rewards; no KL in the reward."""
    if cfg.group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    groups = group_view(batch.reward.float(), cfg.group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=True)
    normalised = ((groups - mean) / (std + 1e-4)).reshape(-1)                 # [B]
    advantages = normalised.unsqueeze(1) * batch.mask.float()
    stats = {"advantage": normalised.mean().item(),
             "baseline_reward": mean.expand_as(groups).mean().item()}
    return Advantages(advantages, None, stats)


@advantage_estimator("gae")
def gae_advantages(batch, cfg):
    """PPO (DeepSpeed-Chat): per-token rewards -β·(log π_old - log π_ref) on every action, plus the
    score clipped to ±clip_reward_value on the last action (column T_b - 1, the EOS included; the
    original's `start + T_b + 1` end assumed a mask without the EOS), then GAE with γ, λ."""
    if batch.values is None:
        raise ValueError("GAE needs the critic's values")
    score = batch.reward.float().clamp(-cfg.clip_reward_value, cfg.clip_reward_value)
    rewards = kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_ctl).float() \
        + score.unsqueeze(1) * last_action_one_hot(batch.mask)
    advantages, returns = gae_advantages_and_returns(rewards, batch.values, batch.mask, cfg.gamma,
                                                     cfg.lam)
    stats = {"advantage": masked_mean(advantages, batch.mask).item(),
             "value": masked_mean(batch.values, batch.mask).item()}
    return Advantages(advantages, returns, stats)


# ------------------------------------------------------------------------------ policy losses

def policy_gradient_loss(logprobs, returns, mask):
    """REINFORCE loss  Σ_{b,t} -w[b,t] · log π_θ[b,t] · mask[b,t] / Σ_{b,t} mask[b,t].

    logprobs: [B, T] new log-probs (with grad), returns: [B, T] weights w (treated as constants),
    mask: [B, T]; prompt positions never count in the normalisation. -> scalar.
    """
    mask = mask.to(logprobs.dtype)
    # clamp: an all-zero mask gives loss 0 instead of the original's 0/0 = NaN (never hit in practice).
    return (-returns.detach() * logprobs * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, cliprange):
    """Per-token PPO surrogate max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = exp(log π_θ - log π_old).

    All [B, T] -> (per-token loss [B, T], clip fraction float: share of real tokens where the clip
    was active). Masked-out tokens get ρ = 1.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp((logprobs - old_logprobs.detach()) * mask)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    clip_frac = ((clipped > unclipped).float() * mask).sum() / mask.sum().clamp(min=1)
    return torch.max(unclipped, clipped), clip_frac.item()


@policy_loss("reinforce")
def reinforce_loss(logprobs, batch, adv, cfg):
    """ReMax / RLOO: `policy_gradient_loss` with the estimator's per-token weights."""
    return policy_gradient_loss(logprobs, adv.advantages, batch.mask), {}


@policy_loss("ppo_clip")
def ppo_clip_loss(logprobs, batch, adv, cfg):
    """PPO: the token mean of the clipped surrogate over every real answer token."""
    per_token, clip_frac = clipped_surrogate(logprobs, batch.logprobs, adv.advantages, batch.mask,
                                             cfg.cliprange)
    mask = batch.mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1), {"clip_frac": clip_frac}


@policy_loss("grpo")
def grpo_loss(logprobs, batch, adv, cfg):
    """GRPO: per token, the clipped surrogate + kl_loss_coef · k3(π_θ ‖ π_ref) (gradient through
    log π_θ); averaged over each answer's tokens, then over answers."""
    per_token, clip_frac = clipped_surrogate(logprobs, batch.logprobs, adv.advantages, batch.mask,
                                             cfg.cliprange)
    mask = batch.mask.to(per_token.dtype)
    ref = batch.ref_logprobs.detach()
    # Padding gets log π = log π_ref (k3 = 0): exp(ref - logπ) there could overflow, and inf·0 = NaN.
    kl = k3_kl(torch.where(mask > 0, logprobs, ref), ref)
    lengths = mask.sum(dim=1).clamp(min=1)
    per_answer = ((per_token + cfg.kl_loss_coef * kl) * mask).sum(dim=1) / lengths
    kl_mean = ((kl.detach() * mask).sum(dim=1) / lengths).mean().item()
    return per_answer.mean(), {"clip_frac": clip_frac, "kl_loss": kl_mean}


def clipped_value_loss(values, old_values, returns, mask, cliprange_value):
    """PPO's value loss 0.5 · max((V - R)², (V_clip - R)²) token mean, V_clip = old V ± ε_v.

    values (with grad), old_values, returns, mask: [B, T] -> scalar.
    """
    mask = mask.to(values.dtype)
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Rollout:
    """What each prompt gets at generation: `samples` sampled answers (the default of
    --num_samples_per_prompt; at least `min_samples`) and optionally a greedy answer."""
    samples: int = 1
    min_samples: int = 1
    greedy_baseline: bool = False


@dataclass(frozen=True)
class Algorithm:
    estimator: str
    loss: str
    rollout: Rollout
    critic: bool = False
    gamma: float = 0.95   # the default of --gamma for this algorithm

    def estimate(self, batch, cfg):
        return ESTIMATORS[self.estimator](batch, cfg)

    def policy_loss(self, logprobs, batch, adv, cfg):
        return POLICY_LOSSES[self.loss](logprobs, batch, adv, cfg)


ALGORITHMS = {
    "remax": Algorithm("remax", "reinforce", Rollout(samples=1, greedy_baseline=True), gamma=0.95),
    # DeepSpeed-Chat's PPO hard-codes γ = 1.0.
    "ppo": Algorithm("gae", "ppo_clip", Rollout(samples=1), critic=True, gamma=1.0),
    "rloo": Algorithm("rloo", "reinforce", Rollout(samples=2, min_samples=2), gamma=0.95),
    "grpo": Algorithm("grpo", "grpo", Rollout(samples=2, min_samples=2), gamma=1.0),
}
