"""How the rollout picks each next token: the original's top-k / top-p sampling (fused over the
top-k candidates, or Hugging Face's warpers), greedy rows inside a sampled batch, and the guard
that keeps non-finite logits away from `torch.multinomial`.

Why the guard: fp16 logits that overflow give NaN probabilities, and `torch.multinomial` on them
is a device-side assert on CUDA, which kills the process with no exception to catch and no
checkpoint (on the CPU it is a catchable RuntimeError, so CPU runs hide it). `FiniteLogits` runs
first at every decoding step: a row whose logits hold a NaN or +inf, or are all -inf, gets the
EOS token as its only candidate (the answer ends there), and `NonFiniteLogits` counts such rows
without a host synchronisation. The stage-3 loop then skips that update on every rank through
the non-finite-loss path (utils/nonfinite.py): counted, logged, streak-limited.
"""
import torch
from transformers import LogitsProcessor

# The original's sampling settings (HF defaults filled in explicitly: top_k 50 was active too).
TOP_P, TOP_K, TEMPERATURE = 0.9, 50, 1.0


class NonFiniteLogits:
    """Counts the (row, step) pairs of the decoding steps since the last `pop()` whose logits
    were non-finite; the count is a device tensor until `pop()` reads it (one sync per rollout).
    `inject`: for tests, the next decoding step's first row is made +inf once (then False)."""

    def __init__(self):
        self._count = None
        self.inject = False

    def add(self, bad_rows):
        count = bad_rows.sum()
        self._count = count if self._count is None else self._count + count

    def pop(self):
        """The count since the last pop (an int), and start again from 0."""
        count, self._count = self._count, None
        return 0 if count is None else int(count)


class FiniteLogits(LogitsProcessor):
    """Rows of `scores` ([B, V]) with a NaN, a +inf or no finite value become "EOS only" (0 at
    `eos_token_id`, -inf elsewhere); `watch` (a NonFiniteLogits) counts them. Finite rows pass
    unchanged, so this is a no-op for every healthy step."""

    def __init__(self, eos_token_id, watch):
        self.eos_token_id = eos_token_id
        self.watch = watch

    def __call__(self, input_ids, scores):
        if self.watch.inject:
            scores = scores.clone()
            scores[0, 0] = float("inf")
            self.watch.inject = False
        # amax propagates NaN, is +inf with any +inf and -inf when every value is -inf.
        bad = ~torch.isfinite(scores.amax(dim=-1))
        self.watch.add(bad)
        eos_only = torch.full_like(scores[:1], float("-inf"))
        eos_only[0, self.eos_token_id] = 0.0
        return torch.where(bad.unsqueeze(1), eos_only, scores)


class ArgmaxRows(LogitsProcessor):
    """Leaves only the arg-max logit of the rows in `rows` ([B] bool), so they decode greedily
    inside a sampled batch; the other rows keep the exact sampling distribution. HF applies custom
    processors before its top-k / top-p warpers, which keep the arg-max, so those rows sample it."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, input_ids, scores):
        best = scores.argmax(dim=-1, keepdim=True)
        only_best = torch.full_like(scores, float("-inf")).scatter(1, best, scores.gather(1, best))
        return torch.where(self.rows.to(scores.device).unsqueeze(1), only_best, scores)


class TopKTopPSampler(LogitsProcessor):
    """Draws each row's next token from the top-k then top-p distribution of HF's warpers (the
    `top_k` largest logits, then the fewest of those whose probability reaches `top_p`, at least
    one; temperature first), working on the k candidates only rather than sorting and masking the
    whole vocabulary; rows in `greedy_rows` ([B] bool) take the arg-max. Returns scores in which
    only the chosen token is finite: used with do_sample=False, HF's greedy step then emits it.
    Expects finite rows (FiniteLogits before it)."""

    def __init__(self, top_k, top_p, temperature=1.0, greedy_rows=None):
        self.top_k, self.top_p, self.temperature = top_k, top_p, temperature
        self.greedy_rows = greedy_rows

    def candidates(self, scores):
        """(token ids [B, k], probabilities [B, k] float32, zero outside the top-p set)."""
        values, tokens = (scores.float() / self.temperature).topk(min(self.top_k, scores.size(-1)))
        probs = values.softmax(dim=-1)                     # descending, as topk returns them
        before = probs.cumsum(dim=-1) - probs              # probability of the likelier tokens
        return tokens, probs.masked_fill(before >= self.top_p, 0.0)

    def __call__(self, input_ids, scores):
        tokens, probs = self.candidates(scores)
        chosen = tokens.gather(1, torch.multinomial(probs, 1))
        if self.greedy_rows is not None:
            chosen = torch.where(self.greedy_rows.to(scores.device).unsqueeze(1),
                                 scores.argmax(dim=-1, keepdim=True), chosen)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def sampling_kwargs(do_sample, fused, greedy_rows, finite):
    """The `generate` keyword arguments of one decoding call: greedy (`do_sample` False), the
    fused sampler, or HF's warpers (`fused` False) with `greedy_rows` ([B] bool or None) decoded
    greedily; `finite` (a FiniteLogits) runs first in every case."""
    greedy = dict(do_sample=False, top_p=None, top_k=None, temperature=None)
    if not do_sample:
        return dict(greedy, logits_processor=[finite])
    if fused:
        return dict(greedy, logits_processor=[
            finite, TopKTopPSampler(TOP_K, TOP_P, TEMPERATURE, greedy_rows)])
    processors = [finite] + ([ArgmaxRows(greedy_rows)] if greedy_rows is not None else [])
    return dict(do_sample=True, top_p=TOP_P, top_k=TOP_K, temperature=TEMPERATURE,
                logits_processor=processors)
