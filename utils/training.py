"""DeepSpeed plumbing shared by the stages: engines, evaluation loops, loaders, metric logs."""
import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from utils.utils import (all_reduce_sum, barrier, get_rank, init_distributed, print_rank_0,
                         save_args, save_code, set_random_seed)

_precision_logged = False


def log_precision_once(ds_config):
    global _precision_logged
    if _precision_logged:
        return
    _precision_logged = True
    if ds_config.get("bf16", {}).get("enabled"):
        precision = "bf16"
    elif ds_config.get("fp16", {}).get("enabled"):
        precision = "fp16 (dynamic loss scaling)"
    else:
        precision = "fp32 (this accelerator cannot train in fp16; pass --bf16 for bf16)"
    print_rank_0(f"[precision] training in {precision}")


def start_stage(args):
    """Start-up of stages 1 and 2: process group, the train DeepSpeed config, seed, and rank 0's
    record of the run (`args.json`, a copy of the code). Returns (device, world_size, ds_config)."""
    from utils.ds_utils import get_train_ds_config, set_batch_sizes

    args.tensorboard_path = args.output_dir
    device, args.global_rank, world_size = init_distributed(args.local_rank)
    ds_config = get_train_ds_config(offload=args.offload, stage=args.zero_stage,
                                    enable_tensorboard=args.enable_tensorboard, bf16=args.bf16,
                                    tb_path=args.tensorboard_path, tb_name="")
    set_batch_sizes(ds_config, args.per_device_train_batch_size, world_size,
                    args.gradient_accumulation_steps)
    set_random_seed(args.seed)
    record_run(args)
    return device, world_size, ds_config


def record_run(args):
    """After a barrier, rank 0 writes `<output_dir>/args.json` and copies the code."""
    barrier()
    if get_rank() == 0:
        save_args(args, args.output_dir)
        save_code(args.output_dir)


def make_loader(dataset, batch_size, collate_fn, shuffle, distributed, seed=0, drop_last=False):
    """A loader over this rank's shard. Distributed loaders shard with a seeded sampler; call
    `set_epoch` on it (the original never did, so every epoch had the same order)."""
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      drop_last=drop_last)


def supervised_loaders(args, train_data, eval_data, collate_fn, world_size):
    """Stage 1/2 loaders: a shuffled train shard per rank and a sharded, ordered eval (reduced over
    ranks by the evaluations; the original's stage-2 eval ran the same batches on every rank)."""
    distributed = world_size > 1
    train = make_loader(train_data, args.per_device_train_batch_size, collate_fn, shuffle=True,
                        distributed=distributed, seed=args.seed)
    evaluation = make_loader(eval_data, args.per_device_eval_batch_size, collate_fn,
                             shuffle=False, distributed=distributed)
    return train, evaluation


def init_stage_engine(model, args, ds_config, train_loader):
    """The stage 1/2 engine: schedule over every optimizer step of the run, then (after
    initialisation, as the original) gradient checkpointing when asked."""
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    engine = init_train_engine(model, args, ds_config, args.learning_rate, args.weight_decay,
                               args.lora_learning_rate, args.num_train_epochs * steps_per_epoch,
                               args.lr_scheduler_type, args.num_warmup_steps)
    if args.gradient_checkpointing:
        engine.gradient_checkpointing_enable()
    return engine


def set_loader_epoch(loader, epoch):
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


def init_train_engine(model, args, ds_config, learning_rate, weight_decay, lora_learning_rate,
                      total_steps, lr_scheduler_type, num_warmup_steps):
    """DeepSpeed engine with AdamW (betas 0.9/0.95), the three parameter groups and the schedule."""
    import deepspeed

    from utils.optim import create_lr_scheduler, create_optimizer, get_optimizer_grouped_parameters

    groups = get_optimizer_grouped_parameters(model, weight_decay, lora_learning_rate)
    offload = ds_config["zero_optimization"]["offload_optimizer"]["device"] != "none"
    optimizer = create_optimizer(groups, learning_rate, offload)
    scheduler = create_lr_scheduler(optimizer, lr_scheduler_type, num_warmup_steps, total_steps)
    log_precision_once(ds_config)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    print_rank_0(f"[optimizer] {type(optimizer).__name__}, lr {learning_rate}, "
                 f"{trainable / 1e6:.2f}M trainable parameters on this rank, {total_steps} steps, "
                 f"{lr_scheduler_type} schedule with {num_warmup_steps} warm-up steps")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, args=args,
                                      config=ds_config, lr_scheduler=scheduler,
                                      dist_init_required=True)
    return engine


def init_eval_engine(model, ds_config):
    """A frozen model as a DeepSpeed inference-only engine (no optimizer)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


@torch.no_grad()
def evaluate_perplexity(model, loader, device, max_batches=None):
    """exp(mean token loss) over the eval loader, reduced over all ranks.

    The original averaged per-batch losses per rank, then averaged the per-rank perplexities; we
    average the batch losses over every batch of every rank, then exponentiate.
    """
    from utils.utils import to_device

    from utils.model.model_utils import unwrap

    was_training = model.training
    # module.eval(), not engine.eval(): with DeepSpeed's hybrid engine the latter would swap in its
    # inference kernels; we want the training forwards without dropout.
    unwrap(model).eval()
    loss_sum, batches = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        loss_sum += model(**batch, use_cache=False).loss.float().item()
        batches += 1
    loss_sum, batches = all_reduce_sum([loss_sum, batches])
    if was_training:
        model.train()
    mean_loss = loss_sum / max(batches, 1)
    try:
        return math.exp(mean_loss), mean_loss
    except OverflowError:
        return float("inf"), mean_loss


class MetricsLog:
    """Rank-0 metric sink: `<output_dir>/metrics.jsonl` always, tensorboard when enabled."""

    def __init__(self, output_dir, enable_tensorboard=False, tensorboard_dir=None):
        self.rank0 = get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if self.rank0 and enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir or output_dir)

    def log(self, step, **scalars):
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None:
            for tag, value in scalars.items():
                if isinstance(value, (int, float)) and "/" in tag:
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir):
    """The records of `<output_dir>/metrics.jsonl` (for tests, the demo report and benchmarks)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(iterable, desc, total=None):
    """A progress bar on rank 0 only."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=get_rank() != 0, dynamic_ncols=True)


class NonFiniteGuard:
    """Stops a run whose loss is NaN/inf for `patience` updates in a row, with a message that says
    what to try, instead of training on garbage (fp16 overflow on Llama-2 is the usual cause)."""

    def __init__(self, patience=3):
        self.patience = patience
        self.bad = 0

    def check(self, loss_value, where):
        if math.isfinite(loss_value):
            self.bad = 0
            return
        self.bad += 1
        print_rank_0(f"[warning] non-finite loss ({loss_value}) at {where}")
        if self.bad >= self.patience:
            raise FloatingPointError(
                f"the loss was non-finite for {self.bad} updates in a row (last at {where}); "
                "lower the learning rate, or use --bf16 / --actor_bf16 instead of fp16")


def interval(num_batches, times_per_epoch):
    """Steps between evaluations; at least 1 (the original divided by zero on small datasets)."""
    return max(1, num_batches // times_per_epoch)


@torch.no_grad()
def evaluate_reward(model, loader, device, max_batches=100):
    """Pairwise accuracy (chosen end score > rejected), mean chosen and mean rejected score.

    Each rank scores its shard; sums are all-reduced, so every rank gets the same numbers (the
    original evaluated the same batches on every rank and averaged per-rank ratios).
    """
    from utils.utils import to_device

    was_training = model.training
    model.eval()
    correct = total = chosen_sum = rejected_sum = 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = model(**to_device(batch, device))
        chosen, rejected = out["chosen_mean_scores"].float(), out["rejected_mean_scores"].float()
        correct += (chosen > rejected).sum().item()
        total += chosen.numel()
        chosen_sum += chosen.sum().item()
        rejected_sum += rejected.sum().item()
    correct, total, chosen_sum, rejected_sum = all_reduce_sum([correct, total, chosen_sum,
                                                               rejected_sum])
    if was_training:
        model.train()
    total = max(total, 1.0)
    return {"acc": correct / total, "chosen_score": chosen_sum / total,
            "rejected_score": rejected_sum / total}


def train_supervised(model, train_loader, args, device, compute_loss, evaluate, save, metrics,
                     stage_name, throughput=None):
    """The stage 1/2 loop: epochs of forward, backward, step; `evaluate()` (returning a dict of
    scalars, already printed) before training, `args.evals_per_epoch` times per epoch (then `save()`,
    as the original did) and at each epoch's end; `save()` at the end.

    `compute_loss(model, batch) -> loss`; `throughput(seconds) -> str` for `--print_loss` runs.
    """
    epochs = args.num_train_epochs
    print_rank_0("***** Running training *****")
    print_rank_0(f"***** Evaluating {stage_name}, Epoch 1/{epochs} *****")
    metrics.log(0, epoch=0, **evaluate())
    eval_every = interval(len(train_loader), args.evals_per_epoch)
    guard = NonFiniteGuard()
    for epoch in range(epochs):
        print_rank_0(f"Beginning of Epoch {epoch + 1}/{epochs}, "
                     f"Total Micro Batches {len(train_loader)}")
        set_loader_epoch(train_loader, epoch)
        model.train()
        bar = progress(train_loader, f"{stage_name} epoch {epoch + 1}/{epochs}")
        for step, batch in enumerate(bar):
            start = time.time()
            loss = compute_loss(model, {k: v.to(device) for k, v in batch.items()})
            if args.print_loss:
                print(f"Epoch: {epoch + 1}, Step: {step}, Rank: {args.global_rank}, "
                      f"loss = {loss.item()}", flush=True)
            guard.check(loss.item(), f"epoch {epoch + 1} step {step}")
            model.backward(loss)
            model.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            metrics.log(model.global_steps, epoch=epoch + 1,
                        **{"Train/loss": loss.item(), "Train/lr": model.get_lr()[0]})
            if args.print_loss and throughput is not None:
                print_rank_0(throughput(time.time() - start))
            if (step + 1) % eval_every == 0 and step + 1 < len(train_loader):
                print_rank_0(f"***** Evaluating {stage_name}, Epoch {epoch + 1}/{epochs} "
                             f"Step {step + 1}/{len(train_loader)} *****")
                metrics.log(model.global_steps, epoch=epoch + 1, **evaluate())
                model.train()
                save()
        print_rank_0(f"***** Evaluating {stage_name}, end of Epoch {epoch + 1}/{epochs} *****")
        metrics.log(model.global_steps, epoch=epoch + 1, **evaluate())
    print_rank_0("saving the final model ...")
    save()
