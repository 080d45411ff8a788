"""Launched by test_policy_trainer.py on 2 ranks: the trainer's chunked LM-head scores under ZeRO-3
(actor and reference partitioned, the head's weight tied to the embedding) against full logits.

Each rank scores its own batch, with a different answer length per rank, so the ranks need
different numbers of chunks and must still run the same number of head forwards. For each path
(full logits, then chunks) a fresh ZeRO-3 actor backwards Σ w · log π; the full gradients
(gathered from the partitions) and the per-rank scores are compared, and rank 0 writes the largest
differences to --out as JSON.

    deepspeed --num_gpus 2 tests/zero3_chunked_scores.py --model DIR --out FILE
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "step3_rlhf_finetuning")]

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from algorithms import ALGORITHMS, AlgorithmSettings  # noqa: E402
from trainer import PolicyTrainer, RolloutSettings  # noqa: E402
from utils.ds_utils import get_eval_ds_config, get_train_ds_config  # noqa: E402
from utils.model.model_utils import disable_dropout_in_config, load_hf_tokenizer  # noqa: E402
from utils.utils import all_reduce_max, init_distributed  # noqa: E402

ROWS, PROMPT = 3, 5


def zero3(config, rows):
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition everything
    config["train_micro_batch_size_per_gpu"] = rows
    config["train_batch_size"] = rows * torch.distributed.get_world_size()
    config["zero_allow_untested_optimizer"] = True
    return config


def engine(path, config, train):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, config=config)
    if train:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        return deepspeed.initialize(model=model, optimizer=optimizer,
                                    config=zero3(get_train_ds_config(offload=False, stage=3), ROWS))[0]
    return deepspeed.initialize(model=model, config=zero3(get_eval_ds_config(offload=False, stage=3),
                                                          ROWS))[0]


def start_worker():
    """The 2-rank workers' start: --model DIR --out FILE (--local_rank from the launcher), the
    process group, the model's tokenizer and its config without dropout.
    Returns (opts, device, rank, tokenizer, config)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    opts = parser.parse_args()
    device, rank, _ = init_distributed(opts.local_rank)
    tokenizer = load_hf_tokenizer(opts.model)
    config = AutoConfig.from_pretrained(opts.model)
    disable_dropout_in_config(config)
    return opts, device, rank, tokenizer, config


def main():
    opts, device, rank, tokenizer, config = start_worker()
    generator = torch.Generator().manual_seed(100 + rank)
    answer = 6 + 5 * rank                       # rank 0: 7 positions, rank 1: 12
    seq = torch.randint(3, config.vocab_size, (ROWS, PROMPT + answer), generator=generator)
    weights = torch.randn(ROWS, answer, generator=generator).to(device)
    seq = seq.to(device)
    mask = torch.ones_like(seq)
    results = []
    for chunk_tokens in (None, 4):
        actor, ref = engine(opts.model, config, True), engine(opts.model, config, False)
        with torch.no_grad():  # the reference differs from the actor, so the KL is not zero
            for p in ref.module.parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.mul_(0.9)
        models = SimpleNamespace(actor=actor, ref=ref, reward=None, critic=None, actor_ema=None,
                                 tokenizer=tokenizer)
        trainer = PolicyTrainer(models, ALGORITHMS["remax"], AlgorithmSettings(),
                                RolloutSettings(max_answer_seq_len=answer,
                                                logit_chunk_tokens=chunk_tokens))
        actor.train()
        scores = trainer._answer_scores(seq, mask, PROMPT, with_reference=True)
        actor.backward((scores["logprobs"] * weights).sum())
        grads = {name: safe_get_full_grad(p).clone() for name, p in actor.module.named_parameters()}
        results.append(({k: v.detach() for k, v in scores.items()}, grads))
    (full, full_grads), (chunked, chunked_grads) = results
    score_diff = max((full[k] - chunked[k]).abs().max().item() for k in full)
    grad_diff = max((full_grads[n] - chunked_grads[n]).abs().max().item() for n in full_grads)
    grad_scale = max(g.abs().max().item() for g in full_grads.values())
    kl = full["full_kl"].mean().item()
    score_diff, grad_diff, grad_scale = all_reduce_max([score_diff, grad_diff, grad_scale])
    if rank == 0:
        with open(opts.out, "w") as f:
            json.dump({"score_diff": score_diff, "grad_diff": grad_diff, "grad_scale": grad_scale,
                       "kl": kl, "keys": sorted(full), "params": len(full_grads)}, f)


if __name__ == "__main__":
    main()
