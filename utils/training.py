"""DeepSpeed plumbing shared by the stages: engines, evaluation loops, loaders, metric logs."""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from utils.atomic import open_atomic
from utils.checkpoint import (Checkpointer, ResumeError, load_training_checkpoint,
                              mark_run_complete, prepare_output_dir, restore_rng,
                              universal_ds_config)
from utils.model.model_utils import full_numel
from utils.nonfinite import NonFiniteUpdates, settle_update
from utils.preflight import start_checked
from utils.utils import (all_reduce_sum, barrier, get_rank, print_rank_0,
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


def start_stage(args, check_inputs):
    """Start-up of stages 1 and 2: `check_inputs()` on every rank, the process group and the
    preflight (every rank's problems, one line on all ranks), the output directory (the finished-run guard,
    or the resume plan of --resume / --resume_from), the train DeepSpeed config, seed, and rank
    0's record of the run (`args.json`, a copy of the code).
    Returns (device, world_size, ds_config, resume plan or None)."""
    from utils.ds_utils import get_train_ds_config, set_batch_sizes

    args.tensorboard_path = args.output_dir
    device, args.global_rank, world_size = start_checked(args, check_inputs)
    resume = prepare_output_dir(args, world_size)
    ds_config = get_train_ds_config(offload=args.offload, stage=args.zero_stage,
                                    enable_tensorboard=args.enable_tensorboard, bf16=args.bf16,
                                    tb_path=args.tensorboard_path, tb_name="")
    if resume is not None and resume.universal:
        ds_config = universal_ds_config(ds_config)
    set_batch_sizes(ds_config, args.per_device_train_batch_size, world_size,
                    args.gradient_accumulation_steps)
    set_random_seed(args.seed)  # a resume's RNG is restored later, right before its first step
    record_run(args)
    return device, world_size, ds_config, resume


def record_run(args):
    """After a barrier, rank 0 writes `<output_dir>/args.json` and copies the code."""
    barrier()
    if get_rank() == 0:
        save_args(args, args.output_dir)
        save_code(args.output_dir)


class EpochRandomSampler(Sampler):
    """A shuffled order that is a function of (seed, epoch) alone: `torch.randperm` from a
    generator seeded with `seed + epoch`, the rule of DistributedSampler, so a resumed epoch
    reproduces its order. Epoch 0 is the order of the RandomSampler we used before (one generator
    seeded with `seed`); later epochs differ from it (it continued that generator's stream)."""

    def __init__(self, data_source, seed=0):
        self.num_samples = len(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self):
        return self.num_samples


def make_loader(dataset, batch_size, collate_fn, shuffle, distributed, seed=0, drop_last=False):
    """A loader over this rank's shard, its order a function of (seed, epoch): call
    `set_loader_epoch` each epoch (the original never did, so every epoch had the same order).

    The loader has its own generator: starting an epoch (or an evaluation) then draws nothing
    from the global torch RNG that dropout uses, so a resumed run's RNG stream is the
    uninterrupted run's (DataLoader otherwise draws a worker seed from it at every `iter`).
    """
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = EpochRandomSampler(dataset, seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed))


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
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
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
    trainable = full_numel(p for g in groups for p in g["params"])
    print_rank_0(f"[optimizer] {type(optimizer).__name__}, lr {learning_rate}, "
                 f"{trainable / 1e6:.2f}M trainable parameters (the whole model's, not one "
                 f"ZeRO-3 rank's share), {total_steps} steps, "
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
    """Rank-0 metric sink: `<output_dir>/metrics.jsonl` always, tensorboard when enabled.

    `keep_lines`: None appends to the file; 0 starts it afresh; N keeps its first N records (a
    resume: the records the interrupted run wrote after its checkpoint are dropped). `lines`
    counts the records in the file (a resume stores it with the loop state)."""

    def __init__(self, output_dir, enable_tensorboard=False, tensorboard_dir=None,
                 keep_lines=None):
        self.rank0 = get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.lines = 0
        if self.rank0:
            self.lines = _truncate_lines(self.path, keep_lines)
        self.writer = None
        if self.rank0 and enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir or output_dir)

    def log(self, step, **scalars):
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        self.lines += 1
        if self.writer is not None:
            for tag, value in scalars.items():
                if isinstance(value, (int, float)) and "/" in tag:
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _truncate_lines(path, keep):
    """Keep the first `keep` lines of `path` (all when None); returns how many it holds."""
    if not os.path.exists(path):
        if keep:
            print_rank_0(f"[resume] warning: {path} is missing; its first {keep} records are lost")
        return 0
    with open(path) as f:
        lines = f.readlines()
    if keep is None:
        return len(lines)
    if len(lines) < keep:
        print_rank_0(f"[resume] warning: {path} holds {len(lines)} records, the checkpoint "
                     f"counted {keep}")
    if len(lines) != keep:
        with open_atomic(path) as f:
            f.writelines(lines[:keep])
    return min(len(lines), keep)


def read_metrics(output_dir):
    """The records of `<output_dir>/metrics.jsonl` (for tests, the demo report and benchmarks)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(iterable, desc, total=None, initial=0):
    """A progress bar on rank 0 only."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=get_rank() != 0,
                dynamic_ncols=True)


def end_update(guard, state, metrics, step, checkpointer):
    """After an optimizer step, on every rank: count a skipped one; after too many non-finite
    updates in a row, save a checkpoint and raise the one-line error (every rank together)."""
    def record(applied, counters):
        state.nonfinite_streak, state.nonfinite_skipped, state.overflow_skipped = (
            counters["nonfinite_streak"], counters["nonfinite_skipped"], counters["overflow_skipped"])

    def checkpoint():
        state.step, state.metrics_lines = step, metrics.lines
        path = checkpointer.save(step, state.to_dict(), state.last_eval)
        checkpointer.close()
        return path

    settle_update(guard, step, metrics, "Train", record, checkpoint)


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


@dataclass
class SupervisedState:
    """Where the stage 1/2 loop is: what a resume reloads besides the engine (whose own state
    holds the optimizer step, `engine.global_steps`)."""
    step: int = 0                     # optimizer steps done
    epoch: int = 0                    # the epoch to continue
    batches_in_epoch: int = 0         # micro-batches of `epoch` already trained on
    batches_per_epoch: int = 0
    samples_per_batch: int = 0        # per-device micro-batch x ranks: one loader step, all ranks
    sampler_seed: int = 0
    num_train_epochs: int = 0
    nonfinite_streak: int = 0         # updates in a row skipped for a non-finite loss
    nonfinite_skipped: int = 0        # updates skipped for a non-finite loss, whole run
    overflow_skipped: int = 0         # optimizer steps DeepSpeed skipped for fp16 overflow
    last_eval: Optional[dict] = None  # {"step": s, "Test/...": v, ...}
    best_eval: Optional[dict] = None
    metrics_lines: int = 0            # records in metrics.jsonl when this state was taken

    def to_dict(self):
        return asdict(self)

    def record_eval(self, step, scalars, metric_name, higher_is_better):
        self.last_eval = {"step": step, **scalars}
        value = scalars.get(metric_name)
        best = None if self.best_eval is None else self.best_eval.get(metric_name)
        if value is not None and (best is None or
                                  (value > best if higher_is_better else value < best)):
            self.best_eval = dict(self.last_eval)


def supervised_state(args, train_loader, world_size, resume=None):
    """A fresh run's state, or the checkpoint's, its data position carried over to this run.

    The position is the number of micro-batches of the epoch already trained on; the resumed run
    skips exactly those of the same-seeded epoch order. With the same samples per loader step
    (per-device batch x ranks) that is the same data whatever the number of ranks (every sampler
    draws `randperm(seed + epoch)` and each step takes the next block of it); otherwise the
    position is rounded down to this run's batches and the warning says how many samples repeat.
    """
    samples = args.per_device_train_batch_size * world_size
    if resume is None:
        return SupervisedState(batches_per_epoch=len(train_loader), samples_per_batch=samples,
                               sampler_seed=args.seed, num_train_epochs=args.num_train_epochs)
    state = SupervisedState(**resume.loop_state)
    if state.num_train_epochs != args.num_train_epochs:
        print_rank_0(f"[resume] warning: --num_train_epochs {args.num_train_epochs}, the "
                     f"checkpoint's run had {state.num_train_epochs}: the LR schedule's horizon "
                     "changes from here on")
        state.num_train_epochs = args.num_train_epochs
    if state.sampler_seed != args.seed:
        raise ResumeError(f"--seed {args.seed} differs from the checkpoint's {state.sampler_seed} "
                          f"(it fixes the data order); resume with --seed {state.sampler_seed}")
    if samples == state.samples_per_batch and len(train_loader) != state.batches_per_epoch \
            and world_size == resume.saved_world_size:
        raise ResumeError(f"the training data changed: {len(train_loader)} batches per epoch, the "
                          f"checkpoint had {state.batches_per_epoch} (same data flags needed)")
    if samples != state.samples_per_batch:
        consumed = state.batches_in_epoch * state.samples_per_batch
        state.batches_in_epoch = consumed // samples
        print_rank_0(f"[resume] warning: {samples} samples per loader step instead of "
                     f"{state.samples_per_batch}: continuing epoch {state.epoch + 1} at batch "
                     f"{state.batches_in_epoch} ({consumed - state.batches_in_epoch * samples} "
                     "samples seen again); the rest of the epoch is not the uninterrupted order")
    state.samples_per_batch, state.batches_per_epoch = samples, len(train_loader)
    return state


def load_supervised_checkpoint(resume, engine, args, train_loader, world_size):
    """The loop state to start from: a fresh one, or (on every rank) the engine loaded from the
    resume plan's checkpoint and its loop state carried over (`supervised_state`)."""
    if resume is not None:
        load_training_checkpoint(resume, {"model": engine})
    return supervised_state(args, train_loader, world_size, resume)


def at_optimizer_boundary(engine):
    """True right after an `engine.step()` that applied an optimizer step."""
    return engine.micro_steps % engine.gradient_accumulation_steps() == 0


def train_supervised(model, train_loader, args, device, compute_loss, evaluate, save, metrics,
                     stage_name, state, checkpoint_metric, resume=None, throughput=None):
    """The stage 1/2 loop: epochs of forward, backward, step; `evaluate()` (returning a dict of
    scalars, already printed) before training, `args.evals_per_epoch` times per epoch (then `save()`,
    as the original did) and at each epoch's end; `save()` at the end.

    Resumable: a checkpoint (engine + `state` + RNG) every `--save_steps` optimizer steps, at the
    end and on SIGTERM, taken at an optimizer-step boundary after that step's evaluation and
    export. `resume` (a plan from `start_stage`) continues `state` exactly: no initial
    evaluation, the epoch's consumed batches skipped, the RNG restored right before the first
    step. `checkpoint_metric`: (name, higher_is_better) of the evaluation that ranks checkpoints.
    Returns True when the run finished (`run_complete.json` written), False when it stopped
    early after saving (SIGTERM, --stop_after_steps).

    `compute_loss(model, batch) -> loss`; `throughput(seconds) -> str` for `--print_loss` runs.
    """
    epochs = args.num_train_epochs
    metric_name, higher_is_better = checkpoint_metric
    checkpointer = Checkpointer(args.output_dir, {"model": model}, args, metric_name,
                                higher_is_better, resumed_step=resume.step if resume else None)

    def log_evaluation(epoch):
        scalars = evaluate()
        metrics.log(model.global_steps, epoch=epoch, **scalars)
        state.record_eval(model.global_steps, scalars, metric_name, higher_is_better)

    def step_boundary():
        """Every rank, after an optimizer step: save when due; True when the loop must stop."""
        state.step, state.metrics_lines = model.global_steps, metrics.lines
        return checkpointer.step_end(model.global_steps, state.to_dict(), state.last_eval)

    print_rank_0("***** Running training *****")
    if resume is None:
        print_rank_0(f"***** Evaluating {stage_name}, Epoch 1/{epochs} *****")
        log_evaluation(0)
    eval_every = interval(len(train_loader), args.evals_per_epoch)
    guard = NonFiniteUpdates(args.max_nonfinite_updates, state.nonfinite_streak,
                             state.nonfinite_skipped, state.overflow_skipped, args.debug_nan_loss)
    for epoch in range(state.epoch, epochs):
        print_rank_0(f"Beginning of Epoch {epoch + 1}/{epochs}, "
                     f"Total Micro Batches {len(train_loader)}")
        set_loader_epoch(train_loader, epoch)
        model.train()
        batches = iter(train_loader)
        for _ in range(state.batches_in_epoch):  # trained on before the resume
            next(batches)
        if resume is not None:  # last, right before the first resumed step, on every rank
            restore_rng(resume)
            resume = None
        bar = progress(batches, f"{stage_name} epoch {epoch + 1}/{epochs}",
                       total=len(train_loader), initial=state.batches_in_epoch)
        for step, batch in enumerate(bar, start=state.batches_in_epoch):
            start = time.time()
            loss = compute_loss(model, {k: v.to(device) for k, v in batch.items()})
            if args.print_loss:
                print(f"Epoch: {epoch + 1}, Step: {step}, Rank: {args.global_rank}, "
                      f"loss = {loss.item()}", flush=True)
            guard.begin_update(model.global_steps + 1)   # the step number it logs and saves as
            loss_value = guard.backward_and_step(model, loss)
            state.batches_in_epoch = step + 1
            bar.set_postfix(loss=f"{loss_value:.4f}")
            metrics.log(model.global_steps, epoch=epoch + 1,
                        **{"Train/loss": loss_value, "Train/lr": model.get_lr()[0]})
            if at_optimizer_boundary(model):
                end_update(guard, state, metrics, model.global_steps, checkpointer)
            if args.print_loss and throughput is not None:
                print_rank_0(throughput(time.time() - start))
            last_of_epoch = step + 1 == len(train_loader)
            if (step + 1) % eval_every == 0 and not last_of_epoch:
                print_rank_0(f"***** Evaluating {stage_name}, Epoch {epoch + 1}/{epochs} "
                             f"Step {step + 1}/{len(train_loader)} *****")
                log_evaluation(epoch + 1)
                model.train()
                save()
            # the last step's checkpoint comes after the end-of-epoch evaluation
            if not last_of_epoch and at_optimizer_boundary(model) and step_boundary():
                return False
        print_rank_0(f"***** Evaluating {stage_name}, end of Epoch {epoch + 1}/{epochs} *****")
        log_evaluation(epoch + 1)
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if at_optimizer_boundary(model) and step_boundary():
            return False
    print_rank_0("saving the final model ...")
    save()
    state.step, state.metrics_lines = model.global_steps, metrics.lines
    checkpointer.save(model.global_steps, state.to_dict(), state.last_eval)
    checkpointer.close()
    mark_run_complete(args.output_dir, {"stage": stage_name, "step": model.global_steps,
                                        "last_eval": state.last_eval})
    return True
