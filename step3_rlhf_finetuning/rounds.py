"""The stage-3 loop's plumbing: how many updates and micro-batches a run has, which prompt batches
make each update, how a round's experience is collected, and what each update logs."""
import math
import os
import time
from dataclasses import dataclass

import torch

from utils.data.data_utils import MiniDataset
from utils.perf import (calculate_flops, current_memory_mib, peak_memory_mib, process_peak_mib,
                        reset_peak_memory, run_reserved_peak_mib, training_passes)
from utils.checkpoint import restore_rng
from utils.training import progress, set_loader_epoch
from utils.utils import all_reduce_max, all_reduce_sum, get_rank, print_rank_0, to_device


@dataclass(frozen=True)
class MicroBatches:
    """Micro-batches whose gradients make one optimizer step, per trained model."""
    actor: int
    critic: int


@dataclass(frozen=True)
class Schedule:
    updates_per_epoch: int
    total_updates: int
    micro_batches: MicroBatches
    optimizer_steps: int      # of the whole run: the LR schedule's horizon


def make_schedule(args, num_samples, train_loader, unsup_loader):
    """One update per `generation_batches` prompt batches; each of its `ppo_epochs` passes is one
    optimizer step over K = generation_batches · ⌈rows / train batch⌉ micro-batches, rows = prompts ·
    samples per prompt (the actor's K doubles with the pretraining mix). The original's horizon
    assumed gen_bs / train_bs steps per batch."""
    updates = len(train_loader) // args.generation_batches
    if unsup_loader is not None:
        updates = min(updates, len(unsup_loader) // args.generation_batches)
    rows = args.per_device_generation_batch_size * num_samples
    k = args.generation_batches * math.ceil(rows / args.per_device_training_batch_size)
    micro = MicroBatches(actor=k * (2 if unsup_loader is not None else 1), critic=k)
    total = args.num_train_epochs * updates
    return Schedule(updates, total, micro, total * args.ppo_epochs)


def training_rounds(train_loader, unsup_loader, args, updates_per_epoch, state, resume=None):
    """Yields (prompt batches, pretraining batches or None) for each update, epoch by epoch, from
    `state`'s position (`state.epoch`, `state.batches_in_epoch`, advanced as batches are handed
    out). Both loaders reshuffle each epoch (the original never reshuffled the mix); their order
    is a function of (seed, epoch), so a resume skips exactly the batches used before it and then
    restores the RNG of every rank, right before its first update."""
    for state.epoch in range(state.epoch, args.num_train_epochs):
        print_rank_0(f"Beginning of Epoch {state.epoch + 1}/{args.num_train_epochs}, "
                     f"Total Generation Batches {len(train_loader)}")
        set_loader_epoch(train_loader, state.epoch)
        set_loader_epoch(unsup_loader, state.epoch)
        total = updates_per_epoch * args.generation_batches
        prompts = iter(train_loader)
        unsup = iter(unsup_loader) if unsup_loader is not None else None
        for _ in range(state.batches_in_epoch):  # used before the resume
            next(prompts)
            if unsup is not None:
                next(unsup)
        if resume is not None:
            restore_rng(resume)
            resume = None
        prompts = iter(progress(prompts, f"{args.algo} epoch {state.epoch + 1}", total=total,
                                initial=state.batches_in_epoch))
        while state.batches_in_epoch + args.generation_batches <= total:
            batches = [next(prompts) for _ in range(args.generation_batches)]
            unsup_batches = [next(unsup) for _ in batches] if unsup is not None else None
            state.batches_in_epoch += len(batches)
            yield batches, unsup_batches
        state.batches_in_epoch = 0


def collect_experience(trainer, prompt_batches, unsup_batches, train_batch_size, device, step,
                       print_answers):
    """Experience of one update's prompt batches, cut into training micro-batches.

    Returns (experience micro-batches, pretraining micro-batches or None, stats averaged over
    the prompt batches, {"generation": s, "experience": s} summed)."""
    exp_buffer = MiniDataset(len(prompt_batches), train_batch_size)
    unsup_buffer = MiniDataset(len(prompt_batches), train_batch_size)
    stats, seconds = {}, {"generation": 0.0, "experience": 0.0}
    experiences = unsup = None
    for i, batch in enumerate(prompt_batches):
        batch = to_device(batch, device)
        exp, batch_stats, batch_seconds = trainer.generate_experience(
            batch["prompt"], batch["prompt_att_mask"], step, print_answers=print_answers)
        for key, value in batch_stats.items():
            stats[key] = stats.get(key, 0.0) + value / len(prompt_batches)
        for key, value in batch_seconds.items():
            seconds[key] += value
        experiences = exp_buffer.add(exp)
        if unsup_batches is not None:
            unsup = unsup_buffer.add(to_device(unsup_batches[i], device))
    return experiences, unsup, stats, seconds


def run_update(trainer, prompt_batches, unsup_batches, args, state, device, world_size):
    """One round: experience of its prompt batches, then the update. Returns (metric means over
    ranks, seconds: generation, experience, training and e2e = the round's wall time). The means
    include the peak memory (MiB) of the experience and of the training phase, and each one's rise
    above the memory in use when it began (what the phase itself allocated);
    `max_rank_reserved_peak_mib` is the fullest rank's whole-run peak (`run_reserved_peak_mib`)."""
    round_start = time.time()
    reset_peak_memory()
    before = current_memory_mib()
    experiences, unsup, stats, seconds = collect_experience(
        trainer, prompt_batches, unsup_batches, args.per_device_training_batch_size, device,
        state.global_step, args.print_answers and state.global_step % 20 == 0)
    stats["experience_peak_mib"] = peak_memory_mib()
    stats["experience_rise_mib"] = stats["experience_peak_mib"] - before
    reset_peak_memory()
    before = current_memory_mib()
    train_start = time.time()
    train_means = trainer.train_step(experiences, unsup)
    if args.dump_first_experience and state.global_step == 0:
        dump_experience(experiences, args.output_dir)
    del experiences, unsup  # nothing of this round outlives its update
    seconds.update(training=time.time() - train_start, e2e=time.time() - round_start)
    train_means["training_peak_mib"] = peak_memory_mib()
    train_means["training_rise_mib"] = train_means["training_peak_mib"] - before
    train_means["process_peak_mib"] = process_peak_mib()
    means = reduce_means({**stats, **train_means}, world_size)
    # The means above say what a typical rank used; whether the run fits is the fullest rank's.
    means["max_rank_reserved_peak_mib"] = all_reduce_max([run_reserved_peak_mib()])[0]
    return means, seconds


def dump_experience(experiences, output_dir):
    path = os.path.join(output_dir, "experience", f"step_0_rank_{get_rank()}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save([{k: v.detach().cpu() for k, v in exp.items()} for exp in experiences], path)


def reduce_means(values, world_size):
    """Means over ranks of a dict of floats (same keys on every rank: the algorithm fixes them)."""
    keys = sorted(values)
    totals = all_reduce_sum([values[k] for k in keys])
    return {k: v / world_size for k, v in zip(keys, totals)}


def update_flops(args, config, num_samples, greedy, world_size):
    """(training, generation) FLOPs of one update, the original's Megatron-formula estimate of the
    actor at the full sequence length: it trains on the sampled answers (`ppo_epochs` passes) and
    decodes those and, with a greedy baseline, one more per prompt."""
    seq_len = args.max_prompt_seq_len + args.max_answer_seq_len
    prompts = args.per_device_generation_batch_size * args.generation_batches * world_size
    passes = training_passes(args.actor_gradient_checkpointing, args.actor_lora_dim,
                             config.hidden_size)
    return (args.ppo_epochs * calculate_flops(passes, prompts * num_samples, seq_len, config),
            calculate_flops(1, prompts * (num_samples + int(greedy)), seq_len, config))


class StepLog:
    """Prints and records one update: the original's two blocks plus timings and the algorithm's
    own metrics. Seconds: generation (decoding), experience (scoring forwards and advantages),
    training (the update), e2e (the round's wall time, from its first prompt to its update's end).
    """

    def __init__(self, args, metrics, world_size, flops, total_updates):
        self.args = args
        self.metrics = metrics
        self.world_size = world_size
        self.flops = flops
        self.total_updates = total_updates

    def answer_tokens(self, means):
        prompts = (self.args.per_device_generation_batch_size * self.args.generation_batches
                   * self.world_size)
        tokens = prompts * self.args.num_samples_per_prompt * means["length"]
        if "greedy_length" in means:
            tokens += prompts * means["greedy_length"]
        return tokens

    def __call__(self, means, seconds, state):
        gen_s, exp_s, train_s, e2e = (seconds["generation"], seconds["experience"],
                                      seconds["training"], seconds["e2e"])
        train_flops, gen_flops = self.flops
        tflops = lambda f, sec: f / max(sec, 1e-9) / self.world_size / 1e12  # noqa: E731
        tokens_per_s = self.answer_tokens(means) / max(gen_s, 1e-9)
        get = lambda key: means.get(key, float("nan"))  # noqa: E731
        print_rank_0(
            f"Epoch: {state.epoch + 1}/{self.args.num_train_epochs} | Step: {state.global_step}/"
            f"{self.total_updates} | Actor Loss: {get('actor_loss'):.4f} | "
            + (f"Critic Loss: {get('critic_loss'):.4f} | " if "critic_loss" in means else "")
            + f"Unsupervised Loss: {get('unsup_loss') if 'unsup_loss' in means else 0.0:.4f}\n"
            f"Average reward score: {get('reward'):.4f} | "
            + (f"baseline (greedy) reward: {get('greedy_reward'):.4f} | "
               if "greedy_reward" in means else "")
            + f"Average return: {get('return'):.4f} | Average length: {get('length'):.1f} ("
            + (f"greedy {get('greedy_length'):.1f}, " if "greedy_length" in means else "")
            + f"truncated {get('truncated'):.2f}) | Average kl: {get('kl'):.4f} | Average "
            f"entropy: {get('entropy'):.4f} | Max kl: {get('max_kl'):.4f} | Max return: "
            f"{get('max_return'):.4f}"
            + (f" | KL ratio: {get('kl_ratio'):.4f}" if "kl_ratio" in means else "") + "\n"
            f"End-to-End => Latency: {e2e:.2f}s, TFLOPs: {tflops(train_flops + gen_flops, e2e):.2f}"
            f" | Generation: {gen_s:.2f}s ({tokens_per_s:.1f} answer tokens/s, TFLOPs: "
            f"{tflops(gen_flops, gen_s):.2f}) | Experience: {exp_s:.2f}s | Training: "
            f"{train_s:.2f}s (TFLOPs: {tflops(train_flops, train_s):.2f})\n" + "-" * 85)
        self.metrics.log(state.global_step, epoch=state.epoch,
                         **{f"train/{m}": v for m, v in means.items()},
                         **{"train/generation_seconds": gen_s, "train/experience_seconds": exp_s,
                            "train/training_seconds": train_s, "train/e2e_seconds": e2e,
                            "train/answer_tokens_per_second": tokens_per_s})
