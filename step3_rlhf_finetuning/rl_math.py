"""Math every stage-3 algorithm shares, as pure tensor functions: log-probs of the taken tokens,
masks of prompt + answer, the degenerate-answer patch, and the entropy / KL / length metrics.

Shapes: B rows, P padded prompt length (= prompt_len), L = P + answer length, V vocabulary,
T = L - P answer actions. Per-action tensors over a whole sequence are [B, L-1]: column j holds the
action seq[:, j+1] predicted at position j, so the answer's actions start at column start = P - 1;
`[:, start:]` of them is the answer-only [B, T] form the algorithms (algorithms.py) work on.
Nothing here knows about DeepSpeed, ranks or files.
"""
import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "gather_log_probs",
    "kl_penalty",
    "k3_kl",
    "action_mask_from_sequences",
    "fix_degenerate_answers",
    "entropy_and_full_kl_from_logits",
    "chunked_answer_scores",
    "masked_mean",
    "masked_mean_from",
    "masked_max_from",
    "answer_lengths",
    "truncated_rate",
    "trim_left_padding",
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


def k3_kl(logprobs, ref_logprobs):
    """k3 estimator of KL(π_θ ‖ π_ref) per token: exp(ref - logπ) - (ref - logπ) - 1 >= 0.

    logprobs (with grad), ref_logprobs: [B, T] -> [B, T]; unbiased, and never negative.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def masked_mean(values, mask):
    """Σ values · mask / Σ mask over the whole batch -> 0-d float32 (0 when the mask is empty).

    values, mask: [B, T].
    """
    mask = mask.float()
    return (values.float() * mask).sum() / mask.sum().clamp(min=1)


def action_mask_from_sequences(seq, prompt_len, pad_token_id):
    """Attention/action mask of prompt + answer of a generated sequence.

    seq: [B, L] -> LongTensor [B, L]: 1 where seq != pad, and also at each row's first pad id at or
    after prompt_len: pad == eos, so keep the first eos of the answer as an action. Pad ids inside
    the prompt (left padding, OPT's BOS </s>) stay 0, like the original; the trainer overwrites
    the prompt part with the prompt's own mask (docs/differences.md, stage 3).
    """
    mask = seq != pad_token_id
    answer_is_pad = seq[:, prompt_len:] == pad_token_id
    first_eos = answer_is_pad & (answer_is_pad.long().cumsum(dim=1) == 1)
    mask[:, prompt_len:] |= first_eos
    return mask.long()


def fix_degenerate_answers(seq, prompt_len, pad_token_id, replacement_token_id):
    """The original's degenerate-answer patch, kept so rewards compare with its runs.

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
        entropy, kl = _entropy_and_kl(torch.log_softmax(actor_logits[:, begin:begin + step].float(), -1),
                                      torch.log_softmax(ref_logits[:, begin:begin + step].float(), -1))
        entropies.append(entropy)
        kls.append(kl)
    return torch.cat(entropies, dim=1), torch.cat(kls, dim=1)


@torch.no_grad()
def _entropy_and_kl(logp, logq):
    """(-Σ p log p, Σ p (log p - log q)) over the last dim of log-probs [..., V] -> [...] each."""
    p = logp.exp()
    # p == 0 terms are 0 (avoids 0 · -inf = NaN when a logit is -inf).
    return (-torch.where(p > 0, p * logp, 0.0).sum(dim=-1),
            torch.where(p > 0, p * (logp - logq), 0.0).sum(dim=-1))


def chunked_answer_scores(actor_hidden, actor_head, labels, num_chunks, ref_hidden=None,
                          ref_head=None):
    """Log-probs of the answer tokens (and, given the reference, its log-probs and the entropy /
    full-KL metrics) from the LM-head inputs, in `num_chunks` chunks of positions, so no
    [B, N, V] logits tensor outlives one chunk.

    actor_hidden, ref_hidden: [B, N, H], the LM-head inputs at positions P-1 … L-1 (N = T + 1);
    actor_head, ref_head: callables [B, n, H] -> [B, n, V] logits (the models' LM heads);
    labels: [B, T] the answer tokens (long). Returns a dict of float32 tensors:
        logprobs [B, T] = log π(label) = logit[label] - logsumexp(logits),
        with a reference also ref_logprobs [B, T], entropy [B, N], full_kl [B, N] (no grad),
    equal to gather_log_probs and entropy_and_full_kl_from_logits over the full logits.
    Each head runs exactly `num_chunks` times on chunks of ceil(N / num_chunks) positions (the
    positions are padded when N is smaller), so ranks that agree on num_chunks run the same
    number of head forwards whatever their N (ZeRO-3 gathers the head's weight at each).
    With grad and several chunks, each actor chunk runs under activation checkpointing: its
    logits are recomputed in the backward instead of kept (one more head product per chunk), so
    memory grows with B · N, not B · N · V; the gradients reach actor_hidden and the head's
    weights as from the unchunked computation.
    """
    positions = actor_hidden.size(1)
    size = -(-positions // num_chunks)
    extra = size * num_chunks - positions
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t  # noqa: E731
    actor_hidden = pad(actor_hidden)
    labels = torch.nn.functional.pad(labels, (0, extra + positions - labels.size(1)))  # N-1: none
    # One chunk is the full logits anyway: keep them rather than recompute them.
    recompute = torch.is_grad_enabled() and actor_hidden.requires_grad and num_chunks > 1
    parts = {"logprobs": [], **({"ref_logprobs": [], "entropy": [], "full_kl": []}
                                if ref_hidden is not None else {})}
    if ref_hidden is not None:
        ref_hidden = pad(ref_hidden)
    for begin in range(0, size * num_chunks, size):
        span = slice(begin, begin + size)
        chunk_labels = labels[:, span].unsqueeze(-1)
        logq = None
        if ref_hidden is not None:
            with torch.no_grad():
                logq = torch.log_softmax(ref_head(ref_hidden[:, span]).float(), dim=-1)
            parts["ref_logprobs"].append(logq.gather(-1, chunk_labels).squeeze(-1))
        pending = [logq]   # the metrics: on the first call, not in the backward's recomputation

        def chunk_logprobs(hidden, chunk_labels, pending=pending):
            logits = actor_head(hidden).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            if pending and pending[0] is not None:
                entropy, kl = _entropy_and_kl(logits.detach() - log_norm.detach().unsqueeze(-1),
                                              pending.pop())
                parts["entropy"].append(entropy)
                parts["full_kl"].append(kl)
            return logits.gather(-1, chunk_labels).squeeze(-1) - log_norm

        hidden = actor_hidden[:, span]
        parts["logprobs"].append(checkpoint(chunk_logprobs, hidden, chunk_labels, use_reentrant=False)
                                 if recompute else chunk_logprobs(hidden, chunk_labels))
        del logq, pending
    scores = {key: (torch.cat(values, dim=1) if len(values) > 1 else values[0])[:, :positions]
              for key, values in parts.items()}
    for key in ("logprobs", "ref_logprobs"):
        if key in scores:
            scores[key] = scores[key][:, :positions - 1]
    return scores


def masked_mean_from(values, mask, start):
    """Σ values[:, start:] · mask[:, start:] / Σ mask[:, start:] over the whole batch -> 0-d float32.

    values: [B, L] (full_kl or entropy), mask: [B, L] attention (action) mask, start = P - 1.
    The original's metric convention, kept so numbers compare with
    published logs: it includes the distribution at P - 1 and the one after the EOS.
    """
    mask = mask[:, start:].float()
    return (values[:, start:].float() * mask).sum() / mask.sum()


def masked_max_from(values, mask, start):
    """max over the batch of values[:, start:] · mask[:, start:] -> 0-d float32 (the original's max_kl)."""
    return (values[:, start:].float() * mask[:, start:].float()).max()


def answer_lengths(action_mask, prompt_len):
    """Answer tokens per row, EOS included: Σ action_mask[:, prompt_len:]. [B, L] -> [B] float32.

    True answer length; the original summed from P - 1 and so reported one more.
    """
    return action_mask[:, prompt_len:].sum(dim=1).float()


def truncated_rate(seq, prompt_len, pad_token_id):
    """Share of rows whose answer seq[:, prompt_len:] holds no eos (= pad) id: it ran to the length cap.

    seq: [B, L] -> 0-d float32. Call it on the generated sequences before fix_degenerate_answers,
    which can overwrite a lone EOS.
    """
    has_eos = (seq[:, prompt_len:] == pad_token_id).any(dim=1)
    return (~has_eos).float().mean()


def trim_left_padding(prompts, prompt_mask):
    """Drop the leading columns that are padding in every row: left-padded [B, P] prompts and
    mask -> [B, P'] with P' the batch's longest prompt. OPT's positions come from the mask and
    Llama's rotary attention depends on relative positions only, so nothing downstream changes."""
    used = prompt_mask.bool().any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    return prompts[:, first:], prompt_mask[:, first:]
