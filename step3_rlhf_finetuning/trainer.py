"""One on-policy trainer for every stage-3 algorithm: rollout, scoring, advantages, update.

What differs between ReMax, PPO, RLOO and GRPO comes from their `Algorithm` entry (algorithms.py):
how many answers a prompt gets and whether a greedy one is decoded, the advantage estimator, the
policy loss and whether a critic is trained. This file is the DeepSpeed plumbing around them.
"""
import inspect
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from algorithms import Advantages, AnswerBatch, clipped_value_loss
from rl_math import (action_mask_from_sequences, answer_lengths, chunked_answer_scores,
                     entropy_and_full_kl_from_logits, fix_degenerate_answers, gather_log_probs,
                     masked_mean, trim_left_padding, truncated_rate)
from rlhf_engine import moving_average
from sampling import FiniteLogits, NonFiniteLogits, sampling_kwargs
from utils.model.lm_head import float32_lm_head
from utils.model.model_utils import lm_head_inputs, unwrap
from utils.model.reward_model import answer_end_index
from utils.nonfinite import NonFiniteUpdates
from utils.utils import all_reduce_max, get_rank, print_rank_0
from utils.zero3_generation import generation_parameters

@dataclass(frozen=True)
class RolloutSettings:
    """How answers are generated and the update is run (start-up values, not flags to re-read)."""
    max_answer_seq_len: int
    num_samples_per_prompt: int = 1
    ppo_epochs: int = 1
    unsup_coef: float = 0.0
    synced_gpus: bool = False   # ZeRO-3 actor on several ranks: every rank runs the same forwards
    # ZeRO-3 actor: gather its parameters once per generate call (DeepSpeed's per-module hooks
    # out meanwhile, utils/zero3_generation.py) when they fit, and decode without synced_gpus;
    # False: ZeRO-3 gathers and releases every module at every decoded token.
    gather_once_for_generation: bool = True
    one_generation_pass: bool = True   # sampled and greedy answers in one batched decode
    one_reward_pass: bool = True       # the reward model once over sampled and greedy answers
    trim_prompt_padding: bool = True   # prompts padded to the batch's longest, not max_prompt_seq_len
    # Policy scoring inside the update forward: the KL penalty's log-probs are the detached values
    # of the forward the loss backpropagates through (valid with one pass and no actor dropout).
    one_actor_forward: bool = False
    # LM head and log-probs / entropy / KL over this many answer tokens (rows x positions) at a
    # time, recomputed in the backward; None: full [B, T+1, V] logits at once.
    logit_chunk_tokens: int | None = 1024
    # Top-k then top-p sampling over the top-k candidates only (TopKTopPSampler), instead of HF's
    # warpers, which sort and mask the whole vocabulary at every step.
    fused_sampling: bool = True
    # The actor's and reference's LM heads compute float32 logits from half-precision weights
    # (utils/model/lm_head.py); False: logits in the engine's dtype, as the original.
    fp32_logits: bool = True


class PolicyTrainer:
    """Turns prompt batches into experience and experience into one update of the actor (and the
    critic, for algorithms that have one)."""

    def __init__(self, rlhf_engine, algorithm, settings, rollout, nonfinite=None,
                 debug_nan_logits=()):
        """`nonfinite`: the NonFiniteUpdates that every backward and step goes through (a
        non-finite loss on any rank skips the optimizer step on every rank; so do non-finite
        logits while decoding). `debug_nan_logits`: (update, rank) pairs whose rollout sees an
        +inf logit (tests)."""
        self.nonfinite = nonfinite or NonFiniteUpdates()
        self.nonfinite_logits = NonFiniteLogits()
        self.debug_nan_logits = set(debug_nan_logits)
        self.engine = rlhf_engine
        self.actor = rlhf_engine.actor
        self.ref = rlhf_engine.ref
        self.reward = rlhf_engine.reward
        self.critic = rlhf_engine.critic
        self.actor_ema = rlhf_engine.actor_ema
        self.tokenizer = rlhf_engine.tokenizer
        self.algorithm = algorithm
        self.settings = settings
        self.rollout = rollout
        if algorithm.critic and self.critic is None:
            raise ValueError("this algorithm trains a critic, but the engine built none")
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_ids = sorted({self.tokenizer.eos_token_id,
                                     *_as_list(unwrap(self.actor).config.eos_token_id)})
        # The original's degenerate-answer patch writes the token of " " (read at run time).
        self.space_token_id = self.tokenizer.encode(" ", add_special_tokens=False)[-1]
        self._keeps_logits = "logits_to_keep" in inspect.signature(unwrap(self.actor).forward).parameters
        if rollout.fp32_logits:
            for name, model in (("actor", self.actor), ("reference", self.ref)):
                print_rank_0(f"[scoring] {name}: {float32_lm_head(unwrap(model))}")

    # ------------------------------------------------------------------ generation

    def _generate(self, prompts, prompt_mask, do_sample, greedy_rows=None):
        """[B, P] left-padded prompts -> [B, L] prompt + answer (at most max_answer_seq_len new
        tokens, finished rows filled with pad = eos). `greedy_rows` ([B] bool): rows decoded
        greedily inside a sampled call. A ZeRO-3 actor's parameters are gathered once for the
        call when they fit (`gather_once_for_generation`); then no forward is a collective and
        each rank stops when its own rows end. Otherwise, with a ZeRO-3 actor on several ranks,
        every rank runs the same number of forwards (synced_gpus), so differing lengths never
        hang."""
        sampling = sampling_kwargs(do_sample, self.rollout.fused_sampling, greedy_rows,
                                   FiniteLogits(self.pad_token_id, self.nonfinite_logits))
        with torch.no_grad(), generation_parameters(
                self.actor, enabled=self.rollout.gather_once_for_generation) as gathered:
            return unwrap(self.actor).generate(
                input_ids=prompts, attention_mask=prompt_mask,
                max_new_tokens=self.rollout.max_answer_seq_len, pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_ids,
                synced_gpus=self.rollout.synced_gpus and not gathered, use_cache=True, **sampling)

    def _decode(self, prompts, prompt_mask, num_samples, with_greedy):
        """k sampled answers per prompt (rows prompt-major) and, `with_greedy`, one greedy answer
        per prompt: in one batched call (greedy rows last) unless `one_generation_pass` is off.
        Returns (sampled [N·k, L], greedy [N, L'] or None)."""
        sampled_prompts = prompts.repeat_interleave(num_samples, dim=0)
        sampled_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
        if not with_greedy:
            return self._generate(sampled_prompts, sampled_mask, do_sample=True), None
        if not self.rollout.one_generation_pass:
            return (self._generate(sampled_prompts, sampled_mask, do_sample=True),
                    self._generate(prompts, prompt_mask, do_sample=False))
        rows = sampled_prompts.size(0)
        greedy_rows = torch.arange(rows + prompts.size(0), device=prompts.device) >= rows
        both = self._generate(torch.cat([sampled_prompts, prompts]),
                              torch.cat([sampled_mask, prompt_mask]), do_sample=True,
                              greedy_rows=greedy_rows)
        return both[:rows], both[rows:]

    def _finish_sequences(self, seq, prompt_len):
        """Apply the original's degenerate-answer patch; return (seq, truncated share, patched
        count). HF generate always emits a token, but keep the patch well-defined without one."""
        if seq.size(1) == prompt_len:
            seq = torch.cat([seq, seq.new_full((seq.size(0), 1), self.pad_token_id)], dim=1)
        truncated = truncated_rate(seq, prompt_len, self.pad_token_id).item()
        seq, patched = fix_degenerate_answers(seq, prompt_len, self.pad_token_id,
                                              self.space_token_id)
        return seq, truncated, int(patched.sum())

    def _scoring_mask(self, seq, prompt_mask, prompt_len):
        """Attention mask for scoring: the answer part is the action mask (first eos kept); the
        prompt part is the prompt's own mask. The original used `seq != pad` for the prompt too,
        which masked OPT's BOS (</s> = pad) although generation and stage 2 attended to it."""
        mask = action_mask_from_sequences(seq, prompt_len, self.pad_token_id)
        mask[:, :prompt_len] = prompt_mask.to(mask.dtype)
        return mask

    def _answer_logits(self, model, seq, mask, prompt_len):
        """Logits at positions P-1 … L-1 only, [B, T+1, V]: the prompt's logits are never used."""
        if self._keeps_logits:
            keep = seq.size(1) - prompt_len + 1
            return model(seq, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        return model(seq, attention_mask=mask, use_cache=False).logits[:, prompt_len - 1:]

    def _answer_values(self, critic, seq, mask, prompt_len):
        """The critic's V(s_t) before each answer action, [B, T] (positions P-1 … L-2)."""
        return critic.forward_value(seq, mask, return_value_only=True)[:, prompt_len - 1:-1].float()

    def _reward(self, seq, mask, prompt_len):
        out = self.reward.forward_value(seq, mask, prompt_length=prompt_len)
        return out["chosen_end_scores"].float()

    def _rewards_together(self, batches, prompt_len):
        """Rewards of several (seq [B_i, L_i], mask) batches in one forward: right-padded to one
        length, each score read at the end index of its unpadded row (causal attention: padding
        after a position leaves its value unchanged). Returns [Σ B_i] float32."""
        length = max(seq.size(1) for seq, _ in batches)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, length - t.size(1)), value=value)  # noqa: E731
        seq = torch.cat([pad(s, self.pad_token_id) for s, _ in batches])
        mask = torch.cat([pad(m, 0) for _, m in batches])
        ends = torch.cat([answer_end_index(s, self.pad_token_id, prompt_len) for s, _ in batches])
        values = self.reward.forward_value(seq, mask, return_value_only=True)
        return values.gather(1, ends.unsqueeze(1)).squeeze(1).float()

    def _enter_generation(self):
        for engine in (self.actor, self.ref, self.reward, self.critic):
            if engine is not None:
                engine.eval()

    def _enter_scoring(self):
        # Score with the Hugging Face forwards (engine.train() restores them when the hybrid engine
        # swapped in its inference kernels for generation) but without dropout (module.eval()).
        self.actor.train()
        unwrap(self.actor).eval()

    # ------------------------------------------------------------------ experience

    def generate_experience(self, prompts, prompt_mask, step=0, print_answers=False,
                            keep_greedy_answers=False):
        """Experience for one prompt batch, as the algorithm's rollout asks: k sampled answers per
        prompt (rows prompt-major) and, for ReMax, one greedy answer each; scored by the actor,
        the reference, the reward model (and the critic); with the estimator's advantages.

        prompts, prompt_mask: [N, P]. Returns (experience, stats, seconds):
          experience: tensors of B = N·k rows, ready to cut into micro-batches —
            prompts [B, P], input_ids / attention_mask [B, L], and answer-only [B, T]
            logprobs, ref_logprobs, action_mask, advantages (+ values, returns with a critic),
            rewards [B] (+ baseline_rewards [B] with a greedy baseline);
          stats: Python floats for logging; seconds: {"generation": s, "experience": s}.
        """
        k = self.rollout.num_samples_per_prompt
        score_policy = not self.rollout.one_actor_forward
        self.nonfinite_logits.inject = (step, get_rank()) in self.debug_nan_logits
        out = self._experience(prompts, prompt_mask, k, self.algorithm.rollout.greedy_baseline,
                               with_critic=self.algorithm.critic, step=step,
                               print_answers=print_answers, score_policy=score_policy)
        exp, stats, seconds = out
        stats["nonfinite_logit_rows"] = float(self.nonfinite_logits.pop())
        if stats["nonfinite_logit_rows"]:
            # Decoded to EOS instead of crashing in torch.multinomial; the update is skipped on
            # every rank as for a non-finite loss.
            self.nonfinite.poison(f"non-finite logits in {int(stats['nonfinite_logit_rows'])} "
                                  "decoding step(s) x row(s) of the rollout")
        if not keep_greedy_answers:  # only evaluation shows them
            exp.pop("greedy_input_ids", None)
        if score_policy:  # else the update forward scores the policy and estimates advantages
            start = time.time()
            stats.update(self._estimate_advantages(exp))
            seconds["experience"] += time.time() - start
        return exp, stats, seconds

    def _estimate_advantages(self, exp):
        """The algorithm's advantages (and value targets) into `exp`; returns their stats."""
        adv = self.algorithm.estimate(answer_batch(exp), self.settings)
        exp["advantages"] = adv.advantages
        if adv.returns is not None:
            exp["returns"] = adv.returns
        # The original's "return" metrics: over every answer column, zeros past the end included.
        return {**adv.stats, "return": adv.advantages.mean().item(),
                "max_return": adv.advantages.abs().max().item()}

    @torch.no_grad()
    def evaluation_experience(self, prompts, prompt_mask):
        """One sampled and one greedy answer per prompt, scored, for every algorithm's evaluation.
        Returns (experience, stats) as `generate_experience` without advantages and critic."""
        exp, stats, _ = self._experience(prompts, prompt_mask, 1, True, with_critic=False)
        bad = self.nonfinite_logits.pop()
        if bad:
            print(f"[warning] rank {get_rank()}: non-finite logits in {bad} decoding step(s) x "
                  "row(s) of an evaluation batch; those answers were ended with EOS", flush=True)
        return exp, stats

    @torch.no_grad()
    def _experience(self, prompts, prompt_mask, num_samples, with_greedy, with_critic, step=0,
                    print_answers=False, score_policy=True):
        if self.rollout.trim_prompt_padding:
            prompts, prompt_mask = trim_left_padding(prompts, prompt_mask)
        prompt_len = prompts.size(1)
        self._enter_generation()
        start = time.time()
        seq, greedy_seq = self._decode(prompts, prompt_mask, num_samples, with_greedy)
        generation_seconds = time.time() - start
        self._enter_scoring()

        start = time.time()
        sampled_prompts = prompts.repeat_interleave(num_samples, dim=0)
        seq, truncated, patched = self._finish_sequences(seq, prompt_len)
        mask = self._scoring_mask(seq, prompt_mask.repeat_interleave(num_samples, dim=0),
                                  prompt_len)
        if print_answers:
            self._print_answers(seq, prompt_len, step, "model")
        if score_policy:
            exp, stats = self._score_policy(seq, mask, prompt_len)
        else:
            exp, stats = {"input_ids": seq, "attention_mask": mask,
                          "action_mask": mask[:, prompt_len:]}, {}
        exp["prompts"] = sampled_prompts
        stats.update(truncated=truncated, patched=patched)
        if with_critic:
            exp["values"] = self._answer_values(self.critic, seq, mask, prompt_len)
        if greedy_seq is None:
            exp["rewards"] = self._reward(seq, mask, prompt_len)
        else:
            greedy_seq, greedy_truncated, _ = self._finish_sequences(greedy_seq, prompt_len)
            greedy_mask = self._scoring_mask(greedy_seq, prompt_mask, prompt_len)
            if print_answers:
                self._print_answers(greedy_seq, prompt_len, step, "greedy")
            exp["rewards"], greedy_reward = self._sampled_and_greedy_rewards(
                (seq, mask), (greedy_seq, greedy_mask), prompt_len)
            # k samples share their prompt's one greedy baseline.
            exp["baseline_rewards"] = greedy_reward.repeat_interleave(num_samples, dim=0)
            exp["greedy_input_ids"] = greedy_seq.repeat_interleave(num_samples, dim=0)
            stats.update(greedy_reward=greedy_reward.mean().item(),
                         greedy_truncated=greedy_truncated,
                         greedy_length=answer_lengths(greedy_mask, prompt_len).mean().item())
        stats["reward"] = exp["rewards"].mean().item()
        # The original scored in train mode, so dropout (when not disabled) perturbed the stored
        # log-probs; we score without dropout.
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        return exp, stats, {"generation": generation_seconds, "experience": time.time() - start}

    def _score_policy(self, seq, mask, prompt_len):
        """Actor and reference log-probs of the answer actions, and the entropy / KL metrics.
        Returns (experience tensors, stats)."""
        exp = {"input_ids": seq, "attention_mask": mask, "action_mask": mask[:, prompt_len:]}
        logprobs, stats = self._policy_scores(exp, prompt_len)
        exp["logprobs"] = logprobs
        return exp, stats

    def _policy_scores(self, exp, prompt_len):
        """The actor's log-probs of the taken tokens [B, T] (with grad when grad is on), the
        reference's into `exp`, and the entropy / KL / length metrics."""
        seq, mask = exp["input_ids"], exp["attention_mask"]
        scores = self._answer_scores(seq, mask, prompt_len, with_reference=True)
        exp["ref_logprobs"] = scores["ref_logprobs"]
        full_kl = scores["full_kl"]
        # The original's metric convention: from position P - 1, so the distribution after the EOS
        # counts too (kept so numbers compare with published logs).
        metric_mask = mask[:, prompt_len - 1:]
        stats = {"length": answer_lengths(mask, prompt_len).mean().item(),
                 "kl": masked_mean(full_kl, metric_mask).item(),
                 "max_kl": (full_kl * metric_mask.float()).max().item(),
                 "entropy": masked_mean(scores["entropy"], metric_mask).item()}
        return scores["logprobs"], stats

    def _answer_scores(self, seq, mask, prompt_len, with_reference):
        """logprobs [B, T] of the actor (with grad when grad is on) and, `with_reference`, the
        reference's ref_logprobs [B, T] and the entropy / full_kl [B, T+1] metrics (no grad):
        in chunks of `logit_chunk_tokens` over the LM-head inputs, or from full logits."""
        answer = seq[:, prompt_len:]
        chunk_tokens = self.rollout.logit_chunk_tokens
        if chunk_tokens is None:
            logits = self._answer_logits(self.actor, seq, mask, prompt_len)      # [B, T+1, V]
            scores = {"logprobs": gather_log_probs(logits[:, :-1], answer)}
            if with_reference:
                with torch.no_grad():
                    ref_logits = self._answer_logits(self.ref, seq, mask, prompt_len)
                scores["ref_logprobs"] = gather_log_probs(ref_logits[:, :-1], answer)
                scores["entropy"], scores["full_kl"] = entropy_and_full_kl_from_logits(
                    logits.detach(), ref_logits, chunk_size=64)
            return scores
        # Every rank runs as many head forwards (ZeRO-3 gathers the head's weight at each one);
        # at most one chunk per position.
        positions = answer.size(1) + 1
        num_chunks = int(all_reduce_max([min(math.ceil(seq.size(0) * positions / chunk_tokens),
                                             positions)])[0])
        actor_hidden, actor_head = self._answer_hidden(self.actor, seq, mask, prompt_len)
        if not with_reference:
            return chunked_answer_scores(actor_hidden, actor_head, answer, num_chunks)
        with torch.no_grad():
            ref_hidden, ref_head = self._answer_hidden(self.ref, seq, mask, prompt_len)
        return chunked_answer_scores(actor_hidden, actor_head, answer, num_chunks, ref_hidden,
                                     ref_head)

    def _answer_hidden(self, model, seq, mask, prompt_len):
        """(LM-head inputs at positions P-1 … L-1 [B, T+1, H], the LM-head module) from one
        forward of `model` in which the head computes nothing; the caller runs the head."""
        head = unwrap(model).get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(unwrap(model)).__name__} has no LM head "
                             "(get_output_embeddings() is None); run with --unchunked_logits")
        with lm_head_inputs(head) as captured:
            self._answer_logits(model, seq, mask, prompt_len)
        return captured[-1][:, -(seq.size(1) - prompt_len + 1):], head

    def _sampled_and_greedy_rewards(self, sampled, greedy, prompt_len):
        """(sampled rewards, greedy rewards) of two (seq, mask) batches: one reward forward over
        both unless `one_reward_pass` is off."""
        if not self.rollout.one_reward_pass:
            return self._reward(*sampled, prompt_len), self._reward(*greedy, prompt_len)
        rewards = self._rewards_together([sampled, greedy], prompt_len)
        rows = sampled[0].size(0)
        return rewards[:rows], rewards[rows:]

    def _print_answers(self, seq, prompt_len, step, tag):
        decode = lambda ids: self.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        print(f"[{tag}]--- prompt --> step={step}, rank={get_rank()}, "
              f"{decode(seq[:, :prompt_len])}", flush=True)
        print(f"[{tag}]--- ans    --> step={step}, rank={get_rank()}, "
              f"{decode(seq[:, prompt_len:])}", flush=True)

    # ------------------------------------------------------------------ the update

    def compute_loss(self, exp):
        """The policy loss of one micro-batch with fresh log-probs of the actor (with grad).
        With `one_actor_forward`, this forward also scores the policy: the reference's log-probs,
        the stored log-probs (its detached values) and the advantages are filled into `exp` here,
        and their metrics returned with the loss's. Returns (loss, stats)."""
        prompt_len = exp["prompts"].size(1)
        if not self.rollout.one_actor_forward:
            logprobs = self._answer_scores(exp["input_ids"], exp["attention_mask"], prompt_len,
                                           with_reference=False)["logprobs"]
            return self.algorithm.policy_loss(logprobs, answer_batch(exp),
                                              stored_advantages(exp), self.settings)
        logprobs, stats = self._policy_scores(exp, prompt_len)
        exp["logprobs"] = logprobs.detach()
        stats.update(self._estimate_advantages(exp))
        loss, loss_stats = self.algorithm.policy_loss(logprobs, answer_batch(exp),
                                                      stored_advantages(exp), self.settings)
        return loss, {**stats, **loss_stats}

    def compute_value_loss(self, exp):
        """The critic's clipped value loss of one micro-batch (with grad)."""
        prompt_len = exp["prompts"].size(1)
        values = self._answer_values(self.critic, exp["input_ids"], exp["attention_mask"],
                                     prompt_len)
        return clipped_value_loss(values, exp["values"], exp["returns"], exp["action_mask"],
                                  self.settings.cliprange_value)

    def train_step(self, experiences, unsupervised_batches=None):
        """One update: `ppo_epochs` passes over the micro-batches of one or more generation rounds.

        The actor's (and critic's) DeepSpeed config accumulates gradients over exactly one pass
        (twice as many micro-batches with the pretraining mix), so DeepSpeed scales each backward
        by 1/K and steps the optimizer (clip 1.0, AdamW, LR schedule) once per pass — the
        original's `backward(loss / K)` ... `step()`. Returns metric means over the micro-batches.
        Every backward and step goes through `self.nonfinite`; its `end_update()` then tells
        whether a step was skipped.
        """
        sums, count = defaultdict(float), 0
        for _ in range(self.rollout.ppo_epochs):
            for i, exp in enumerate(experiences):
                loss, stats = self.compute_loss(exp)
                sums["actor_loss"] += self.nonfinite.backward_and_step(self.actor, loss, "actor")
                for key, value in stats.items():
                    sums[key] += value
                if self.algorithm.critic:
                    sums["critic_loss"] += self.nonfinite.backward_and_step(
                        self.critic, self.compute_value_loss(exp), "critic")
                if unsupervised_batches is not None:
                    sums["unsup_loss"] += self.train_unsupervised(unsupervised_batches[i],
                                                                  self.rollout.unsup_coef)
                count += 1
        if self.actor_ema is not None:
            moving_average(self.actor, self.actor_ema)
        return {key: value / max(count, 1) for key, value in sums.items()}

    def train_unsupervised(self, batch, unsup_coef):
        """DeepSpeed-Chat's pretraining mix: LM loss on a pretraining batch, scaled by unsup_coef,
        accumulated into the same optimizer step (the original raised NotImplementedError)."""
        loss = self.actor(**batch, use_cache=False).loss
        self.nonfinite.backward_and_step(self.actor, unsup_coef * loss, "pretraining-mix")
        return loss.item()


def answer_batch(exp):
    """The answer-only view of an experience dict that estimators and losses read."""
    return AnswerBatch(logprobs=exp["logprobs"], ref_logprobs=exp["ref_logprobs"],
                       mask=exp["action_mask"], reward=exp["rewards"],
                       baseline_reward=exp.get("baseline_rewards"), values=exp.get("values"))


def stored_advantages(exp):
    return Advantages(exp["advantages"], exp.get("returns"))


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
