"""Stage-3 evaluation: reward of sampled (and greedy) answers on held-out prompts, KL and entropy
against the reference, answer length, and perplexity on the SFT eval split.

Every number is reduced over all ranks before anything branches on it (the original's evaluation
was rank-local, so save and early-stop decisions could differ between ranks).
"""
import json
import os

import torch

from utils.atomic import open_atomic
from utils.training import evaluate_perplexity
from utils.utils import all_reduce_sum, get_rank

EVAL_KEYS = ("reward", "greedy_reward", "length", "greedy_length", "kl", "entropy", "truncated")


@torch.no_grad()
def evaluate_policy(trainer, eval_loader, ppl_loader, args, global_step, device):
    """Mean over at most `args.eval_batches` prompt batches per rank (and all ranks) of one sampled
    and one greedy answer per prompt, whatever the algorithm, and the perplexity."""
    sums = dict.fromkeys(EVAL_KEYS, 0.0)
    batches = 0
    answers = []
    for i, batch in enumerate(eval_loader):
        if i >= args.eval_batches:
            break
        prompts = batch["prompt"].to(device)
        exp, stats = trainer.evaluation_experience(prompts, batch["prompt_att_mask"].to(device))
        for key in EVAL_KEYS:
            sums[key] += stats[key]
        batches += 1
        if args.save_answers and i < 10:
            answers += decode_answers(trainer.tokenizer, exp, exp["prompts"].size(1),
                                      global_step)
    totals = all_reduce_sum([sums[k] for k in EVAL_KEYS] + [batches])
    count = max(totals[-1], 1.0)
    report = {k: v / count for k, v in zip(EVAL_KEYS, totals[:-1])}
    report["ppl"], _ = evaluate_perplexity(trainer.actor, ppl_loader, device,
                                           max_batches=args.ppl_eval_batches)
    trainer.actor.train()
    if args.save_answers:
        append_answers(os.path.join(args.output_dir, "evaluation", f"rank_{get_rank()}.json"),
                       answers)
    return report


def decode_answers(tokenizer, exp, prompt_len, global_step):
    decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    prompts = decode(exp["input_ids"][:, :prompt_len])
    sampled = decode(exp["input_ids"][:, prompt_len:])
    greedy = decode(exp["greedy_input_ids"][:, prompt_len:])
    return [{"global_step": global_step, "prompt": p, "answer": a, "reward": r,
             "greedy_answer": g, "greedy_reward": gr}
            for p, a, r, g, gr in zip(prompts, sampled, exp["rewards"].tolist(), greedy,
                                      exp["baseline_rewards"].tolist())]


def append_answers(path, records):
    """The original's answer dump: one JSON array per rank, ids continuing across evaluations
    (we add the greedy answer and its reward to each record). Written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    existing = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
    next_id = existing[-1]["id"] + 1 if existing else 0
    for offset, record in enumerate(records):
        existing.append({"id": next_id + offset, **record})
    with open_atomic(path) as f:
        json.dump(existing, f, indent=2, ensure_ascii=False)
