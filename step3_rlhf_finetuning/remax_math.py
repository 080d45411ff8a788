"""The ReMax math as pure tensor functions (SPEC §0, §9.4-§9.6).

ReMax is REINFORCE with a greedy-decoding baseline b(x) = r(x, ā). Per answer token t (1..T, EOS
included) the code weights log π_θ(a_t | x, a_<t) by

    w_t = clip(r(x, a) - r(x, ā), ±c) · γ^(T - t + 1)  -  β · (log π_old(a_t|·) - log π_ref(a_t|·))

and minimises  -Σ_{b,t} w_{b,t} · log π_θ(a_{b,t}|·) / Σ_b T_b, with w held constant.

Shapes: B batch, P padded prompt length (= prompt_len), L = P + answer length, V vocabulary.
Per-action tensors are [B, L-1]: column j holds the action seq[:, j+1] predicted at position j, so the
answer's actions start at column start = P - 1. Nothing here knows about DeepSpeed, ranks or files.
"""
import torch

__all__ = [
    "gather_log_probs",
    "kl_penalty",
    "compute_returns",
    "policy_gradient_loss",
    "action_mask_from_sequences",
    "fix_degenerate_answers",
    "entropy_and_full_kl_from_logits",
    "masked_mean_from",
    "masked_max_from",
    "answer_lengths",
    "truncated_rate",
]


def gather_log_probs(logits, labels):
    """log π(label | ·) = log_softmax(logits)[..., label], in float32.

    logits: [..., V], labels: [...] (long) -> [...] float32.
    For the actions of a sequence pass `logits[:, :-1]` and `seq[:, 1:]` -> [B, L-1].
    Computed as logit[label] - logsumexp(logits), so no full-vocabulary log-softmax tensor is built
    (half-precision logits are upcast for the logsumexp).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def kl_penalty(logprobs, ref_logprobs, kl_ctl):
    """Per-token KL penalty -β · (log π_old - log π_ref). logprobs, ref_logprobs: [B, L-1] -> [B, L-1]."""
    return -kl_ctl * (logprobs - ref_logprobs)


@torch.no_grad()
def compute_returns(kl_penalty, reward, action_mask, start, gamma, clip_reward_value):
    """ReMax returns: the per-token weight w of the policy-gradient loss (SPEC §9.4 compute_returns).

    kl_penalty:  [B, L-1] per-token -β·(log π_old - log π_ref)
    reward:      [B]      r(x, a) - r(x, ā), baseline already subtracted, not yet clipped
    action_mask: [B, L-1] = attention_mask[:, 1:]
    start:       P - 1, the column of the first answer action

    With T_b = Σ_{j >= start} action_mask[b, j] (answer tokens incl. EOS) and end_b = start + T_b:
        returns[b, j] = kl_penalty[b, j] + γ^(end_b - j) · clip(reward_b, ±clip_reward_value)
    for start <= j < end_b (γ¹ on the last action, γ^T_b on the first), 0 elsewhere. Like the
    original, the answer region is the first T_b columns from start (the mask counts, its positions
    do not); in practice the answer mask is contiguous 1s then 0s, so the two agree.

    kl_ratio: mean over the visited (b, j) of |kl| / (|kl| + |discounted reward| + 1e-6), a Python
    float (0.0 when nothing is visited; the original divided by zero there).

    Returns (returns [B, L-1] float32, kl_ratio float).
    """
    # float32 whatever the model dtype; the original rounded the running reward to bf16 (SPEC §13.1 item 25).
    kl = kl_penalty.float()
    clipped = reward.float().clamp(-clip_reward_value, clip_reward_value)          # clip(r - b)
    answer_len = action_mask[:, start:].sum(dim=1)                                  # T_b
    end = start + answer_len                                                        # end_b
    cols = torch.arange(kl.size(1), device=kl.device)
    visited = (cols >= start) & (cols < end.unsqueeze(1))                           # [B, L-1]
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


def policy_gradient_loss(logprobs, returns, mask):
    """REINFORCE loss  Σ_{b,j} -w[b,j] · log π_θ[b,j] · mask[b,j] / Σ_{b,j} mask[b,j].

    logprobs: [B, N] new log-probs (with grad), returns: [B, N] weights w (treated as constants),
    mask: [B, N]. The caller passes the action columns j >= start only (`[:, start:]` of the
    [B, L-1] tensors), so prompt positions do not count in the normalisation. -> scalar.
    """
    mask = mask.to(logprobs.dtype)
    # clamp: an all-zero mask gives loss 0 instead of the original's 0/0 = NaN (never hit in practice).
    return (-returns.detach() * logprobs * mask).sum() / mask.sum().clamp(min=1)


def action_mask_from_sequences(seq, prompt_len, pad_token_id):
    """Attention/action mask of prompt + answer (SPEC §9.4 generate_experience step 2).

    seq: [B, L] -> LongTensor [B, L]: 1 where seq != pad, and also at each row's first pad id at or
    after prompt_len: pad == eos, so keep the first eos of the answer as an action. Pad ids inside
    the prompt (left padding, OPT's BOS </s>) stay 0, like the original (SPEC §13.1 item 7).
    """
    mask = seq != pad_token_id
    answer_is_pad = seq[:, prompt_len:] == pad_token_id
    first_eos = answer_is_pad & (answer_is_pad.long().cumsum(dim=1) == 1)
    mask[:, prompt_len:] |= first_eos
    return mask.long()


def fix_degenerate_answers(seq, prompt_len, pad_token_id, replacement_token_id):
    """The original's degenerate-answer patch (SPEC §9.4, §13.1 item 6).

    Rows whose answer seq[:, prompt_len:] has <= 1 non-pad token get column prompt_len overwritten by
    replacement_token_id (the caller passes tokenizer.encode(" ")[-1]). `<= 1` also rewrites genuine
    one-token answers, as the original did; nothing is filtered out.
    seq: [B, L] with L > prompt_len -> (patched copy [B, L], patched_rows [B] bool).
    """
    if seq.size(1) <= prompt_len:
        raise ValueError(f"sequences of length {seq.size(1)} have no answer after prompt_len={prompt_len}")
    valid_answer_len = (seq[:, prompt_len:] != pad_token_id).sum(dim=1)
    patched_rows = valid_answer_len <= 1
    patched = seq.clone()
    patched[patched_rows, prompt_len] = replacement_token_id
    return patched, patched_rows


@torch.no_grad()
def entropy_and_full_kl_from_logits(actor_logits, ref_logits, chunk_size=None):
    """Full-vocabulary metrics of the next-token distributions p = π_actor, q = π_ref (no grad).

    actor_logits, ref_logits: [B, L, V] -> (entropy [B, L], full_kl [B, L]), float32:
        entropy = -Σ_v p log p,   full_kl = KL(p ‖ q) = Σ_v p (log p - log q).
    chunk_size: positions per chunk along L, to bound the float32 temporaries (None: all at once).
    """
    entropies, kls = [], []
    step = chunk_size or actor_logits.size(1)
    for begin in range(0, actor_logits.size(1), step):
        logp = torch.log_softmax(actor_logits[:, begin:begin + step].float(), dim=-1)
        logq = torch.log_softmax(ref_logits[:, begin:begin + step].float(), dim=-1)
        p = logp.exp()
        # p == 0 terms are 0 (avoids 0 · -inf = NaN when a logit is -inf).
        entropies.append(-torch.where(p > 0, p * logp, 0.0).sum(dim=-1))
        kls.append(torch.where(p > 0, p * (logp - logq), 0.0).sum(dim=-1))
    return torch.cat(entropies, dim=1), torch.cat(kls, dim=1)


def masked_mean_from(values, mask, start):
    """Σ values[:, start:] · mask[:, start:] / Σ mask[:, start:] over the whole batch -> 0-d float32.

    values: [B, L] (full_kl or entropy), mask: [B, L] attention (action) mask, start = P - 1.
    The original's metric convention (SPEC §9.5, §9.6c, §13.1 item 8), kept so numbers compare with
    published logs: it includes the distribution at P - 1 and the one after the EOS.
    """
    mask = mask[:, start:].float()
    return (values[:, start:].float() * mask).sum() / mask.sum()


def masked_max_from(values, mask, start):
    """max over the batch of values[:, start:] · mask[:, start:] -> 0-d float32 (the original's max_kl)."""
    return (values[:, start:].float() * mask[:, start:].float()).max()


def answer_lengths(action_mask, prompt_len):
    """Answer tokens per row, EOS included: Σ action_mask[:, prompt_len:]. [B, L] -> [B] float32.

    True answer length; the original summed from P - 1 and so reported one more (SPEC §13.1 item 8).
    """
    return action_mask[:, prompt_len:].sum(dim=1).float()


def truncated_rate(seq, prompt_len, pad_token_id):
    """Share of rows whose answer seq[:, prompt_len:] holds no eos (= pad) id: it ran to the length cap.

    seq: [B, L] -> 0-d float32. Call it on the generated sequences before fix_degenerate_answers,
    which can overwrite a lone EOS.
    """
    has_eos = (seq[:, prompt_len:] == pad_token_id).any(dim=1)
    return (~has_eos).float().mean()
