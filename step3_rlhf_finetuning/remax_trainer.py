"""ReMax trainer: experience generation (sampled answer + greedy baseline), the policy-gradient
update, and the optional pretraining mix and EMA. The math lives in remax_math.py (pure functions,
re-exported here); this file is the DeepSpeed plumbing around it.
"""
import time

import torch

from remax_math import (action_mask_from_sequences, answer_lengths, compute_returns,  # noqa: F401
                        entropy_and_full_kl_from_logits, fix_degenerate_answers, gather_log_probs,
                        kl_penalty, masked_max_from, masked_mean_from, policy_gradient_loss,
                        truncated_rate)
from rlhf_engine import moving_average
from utils.model.model_utils import unwrap
from utils.utils import get_rank, get_world_size

# The original's sampling settings (HF defaults filled in explicitly: top_k 50 was active too).
TOP_P, TOP_K, TEMPERATURE = 0.9, 50, 1.0


class ReMaxTrainer:
    """Turns prompt batches into experience and experience into one actor update."""

    def __init__(self, rlhf_engine, args):
        self.engine = rlhf_engine
        self.actor = rlhf_engine.actor
        self.ref = rlhf_engine.ref
        self.reward = rlhf_engine.reward
        self.actor_ema = rlhf_engine.actor_ema
        self.tokenizer = rlhf_engine.tokenizer
        self.args = args
        self.max_answer_seq_len = args.max_answer_seq_len
        self.kl_ctl = args.kl_ctl
        self.gamma = args.gamma
        # The original hard-coded 5.0 and ignored the flag; its default is 5.0.
        self.clip_reward_value = args.clip_reward_value
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_ids = sorted({self.tokenizer.eos_token_id,
                                     *_as_list(unwrap(self.actor).config.eos_token_id)})
        # The original's degenerate-answer patch writes the token of " " (read at run time).
        self.space_token_id = self.tokenizer.encode(" ", add_special_tokens=False)[-1]
        self.synced_gpus = args.actor_zero_stage == 3 and get_world_size() > 1
        self.generate_time = 0.0

    # ------------------------------------------------------------------ generation and scoring

    def _generate(self, prompts, prompt_mask, do_sample):
        """[B, P] left-padded prompts -> [B, L] prompt + answer (at most max_answer_seq_len new
        tokens, finished rows filled with pad = eos). With a ZeRO-3 actor on several ranks every
        rank runs the same number of forwards (synced_gpus), so differing lengths never hang."""
        sampling = dict(do_sample=True, top_p=TOP_P, top_k=TOP_K, temperature=TEMPERATURE) \
            if do_sample else dict(do_sample=False, top_p=None, top_k=None, temperature=None)
        with torch.no_grad():
            return unwrap(self.actor).generate(
                input_ids=prompts, attention_mask=prompt_mask,
                max_new_tokens=self.max_answer_seq_len, pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_ids, synced_gpus=self.synced_gpus, use_cache=True,
                **sampling)

    def _finish_sequences(self, seq, prompt_len):
        """Pad answers that stopped short to a common length handled by generate; apply the
        original's degenerate-answer patch; return (seq, truncated share, patched count)."""
        if seq.size(1) == prompt_len:  # every row ended before producing a token (cannot happen
            # with HF generate, which always emits one token, but keep the patch well-defined)
            seq = torch.cat([seq, seq.new_full((seq.size(0), 1), self.pad_token_id)], dim=1)
        truncated = truncated_rate(seq, prompt_len, self.pad_token_id).item()
        seq, patched = fix_degenerate_answers(seq, prompt_len, self.pad_token_id,
                                              self.space_token_id)
        return seq, truncated, int(patched.sum())

    def _scoring_mask(self, seq, prompt_mask, prompt_len):
        """Attention mask for scoring: the answer part is the action mask (first eos kept); the
        prompt part is the prompt's own mask. The original used `seq != pad` for the prompt too,
        which masked OPT's BOS (</s> = pad) although generation and stage 2 attended to it,
        shifting OPT's learned positions by one (SPEC §13.1 item 7)."""
        mask = action_mask_from_sequences(seq, prompt_len, self.pad_token_id)
        mask[:, :prompt_len] = prompt_mask.to(mask.dtype)
        return mask

    def _reward(self, seq, mask, prompt_len):
        out = self.reward.forward_value(seq, mask, prompt_length=prompt_len)
        return out["chosen_end_scores"].float()

    def generate_experience(self, prompts, prompt_mask, step=0, print_answers=False,
                            training_mode=True):
        """Sample an answer and decode a greedy one (the baseline) for each prompt, and score both.

        prompts, prompt_mask: [B, P]. Returns a dict of tensors: prompts [B, P], input_ids and
        attention_mask [B, L] (the sampled sequence), logprobs / ref_logprobs [B, L-1], rewards and
        baseline_rewards [B], full_kl and entropy [B, L]; plus Python floats for logging.
        """
        prompt_len = prompts.size(1)
        self.actor.eval()
        self.ref.eval()
        self.reward.eval()
        start = time.time()
        seq = self._generate(prompts, prompt_mask, do_sample=True)
        greedy_seq = self._generate(prompts, prompt_mask, do_sample=False) if training_mode \
            else None
        self.generate_time = time.time() - start
        # Score with the Hugging Face forwards (engine.train() restores them when the hybrid engine
        # swapped in its inference kernels for generation) but without dropout (module.eval()).
        self.actor.train()
        unwrap(self.actor).eval()

        seq, truncated, patched = self._finish_sequences(seq, prompt_len)
        mask = self._scoring_mask(seq, prompt_mask, prompt_len)
        if print_answers:
            self._print_answers(seq, prompt_len, step, "model")
        with torch.no_grad():
            actor_logits = self.actor(seq, attention_mask=mask, use_cache=False).logits
            ref_logits = self.ref(seq, attention_mask=mask, use_cache=False).logits
            rewards = self._reward(seq, mask, prompt_len)
            logprobs = gather_log_probs(actor_logits[:, :-1], seq[:, 1:])
            ref_logprobs = gather_log_probs(ref_logits[:, :-1], seq[:, 1:])
            entropy, full_kl = entropy_and_full_kl_from_logits(actor_logits, ref_logits,
                                                               chunk_size=64)
            del actor_logits, ref_logits
            exp = {"prompts": prompts, "input_ids": seq, "attention_mask": mask,
                   "logprobs": logprobs, "ref_logprobs": ref_logprobs, "rewards": rewards,
                   "full_kl": full_kl, "entropy": entropy, "baseline_rewards": None}
            stats = {"truncated": truncated, "patched": patched,
                     "length": answer_lengths(mask, prompt_len).mean().item()}
            if greedy_seq is not None:
                greedy_seq, greedy_truncated, _ = self._finish_sequences(greedy_seq, prompt_len)
                greedy_mask = self._scoring_mask(greedy_seq, prompt_mask, prompt_len)
                if print_answers:
                    self._print_answers(greedy_seq, prompt_len, step, "greedy")
                exp["baseline_rewards"] = self._reward(greedy_seq, greedy_mask, prompt_len)
                exp["greedy_input_ids"] = greedy_seq
                stats.update(greedy_truncated=greedy_truncated,
                             greedy_length=answer_lengths(greedy_mask, prompt_len).mean().item())
        exp["stats"] = stats
        # The original scored in train mode, so dropout (when not disabled) perturbed the stored
        # log-probs; we score without dropout (SPEC §13.1 item 19).
        self.actor.train()
        return exp

    def _print_answers(self, seq, prompt_len, step, tag):
        decode = lambda ids: self.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        print(f"[{tag}]--- prompt --> step={step}, rank={get_rank()}, "
              f"{decode(seq[:, :prompt_len])}", flush=True)
        print(f"[{tag}]--- ans    --> step={step}, rank={get_rank()}, "
              f"{decode(seq[:, prompt_len:])}", flush=True)

    # ------------------------------------------------------------------ the update

    def compute_loss(self, exp):
        """ReMax loss of one micro-batch: returns = per-token KL penalty + discounted clipped
        (r(sampled) - r(greedy)); loss = -Σ returns · log π_θ · mask / Σ mask over the answer.

        Returns (loss, returns[:, start:], kl_ratio)."""
        seq, mask = exp["input_ids"], exp["attention_mask"]
        start = exp["prompts"].size(1) - 1
        action_mask = mask[:, 1:]
        penalty = kl_penalty(exp["logprobs"], exp["ref_logprobs"], self.kl_ctl)
        advantage = exp["rewards"] - exp["baseline_rewards"]  # r(x, a) - r(x, ā)
        returns, kl_ratio = compute_returns(penalty, advantage, action_mask, start, self.gamma,
                                            self.clip_reward_value)
        logits = self.actor(seq, attention_mask=mask, use_cache=False).logits
        new_logprobs = gather_log_probs(logits[:, :-1], seq[:, 1:])
        loss = policy_gradient_loss(new_logprobs[:, start:], returns[:, start:],
                                    action_mask[:, start:])
        return loss, returns[:, start:], kl_ratio

    def train_step(self, experiences, unsupervised_batches=None):
        """One actor update over the micro-batches of one or more generation rounds.

        The actor's DeepSpeed config accumulates gradients over exactly these micro-batches (twice
        as many with the pretraining mix), so DeepSpeed scales each backward by 1/K and steps the
        optimizer (clip 1.0, AdamW, LR schedule) once, at the last one — the original's
        `backward(loss / K)` ... `step()`. Returns the summed metrics (divide by K to average).
        """
        args = self.args
        if args.actor_gradient_checkpointing:
            unwrap(self.actor).gradient_checkpointing_enable()
        sums = dict.fromkeys(("actor_loss", "unsup_loss", "reward", "baseline_reward",
                              "advantage", "return", "max_return", "kl_ratio", "kl", "max_kl",
                              "entropy"), 0.0)
        for i, exp in enumerate(experiences):
            loss, returns, kl_ratio = self.compute_loss(exp)
            self.actor.backward(loss)
            self.actor.step()
            start = exp["prompts"].size(1) - 1
            mask = exp["attention_mask"]
            sums["actor_loss"] += loss.item()
            sums["reward"] += exp["rewards"].mean().item()
            sums["baseline_reward"] += exp["baseline_rewards"].mean().item()
            sums["advantage"] += (exp["rewards"] - exp["baseline_rewards"]).mean().item()
            sums["return"] += returns.mean().item()
            sums["max_return"] += returns.abs().max().item()
            sums["kl_ratio"] += kl_ratio
            sums["kl"] += masked_mean_from(exp["full_kl"], mask, start).item()
            sums["max_kl"] += masked_max_from(exp["full_kl"], mask, start).item()
            sums["entropy"] += masked_mean_from(exp["entropy"], mask, start).item()
            if unsupervised_batches is not None:
                sums["unsup_loss"] += self.train_unsupervised(unsupervised_batches[i],
                                                              args.unsup_coef)
        if self.actor_ema is not None:
            moving_average(self.actor, self.actor_ema)
        if args.actor_gradient_checkpointing:
            unwrap(self.actor).gradient_checkpointing_disable()
        return sums

    def train_unsupervised(self, batch, unsup_coef):
        """DeepSpeed-Chat's pretraining mix: LM loss on a pretraining batch, scaled by unsup_coef,
        accumulated into the same optimizer step (the original raised NotImplementedError)."""
        loss = self.actor(**batch, use_cache=False).loss
        self.actor.backward(unsup_coef * loss)
        self.actor.step()
        return loss.item()

    def overflowed(self):
        """True when DeepSpeed skipped the last step for an fp16 overflow."""
        optimizer = getattr(self.actor, "optimizer", None)
        return bool(getattr(optimizer, "overflow", False))


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
