"""Command-line flags shared by the stages, defined once. Names and defaults are the original's.

Checks, all raising UserError (one line naming the flag or file, exit code 2 under run_main):
* `finish` -> `check_common_args`: the flags alone, at parse time, on every rank;
* `check_inputs`: the files the flags name (model directories, reward-model directories,
  datasets, tokenizers), called by a stage's main() right after parse_args, before the process
  group, the output directory or any model exists. Neither touches a collective.
"""
import argparse
import math

from transformers import SchedulerType

from utils.errors import UserError, exit_with_error
from utils.nonfinite import add_nonfinite_args, parse_debug_nan_loss

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup"]


def add_data_args(parser, sft_only=False):
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", nargs="*", default=["Dahoas/rm-static"],
                       help="Datasets: hub ids whose local copies are given as paths ending in the "
                            "id (e.g. /data/Dahoas/rm-static), or local/jsonfile.")
    group.add_argument("--data_split", type=str, default="2,4,4",
                       help="Proportions of each dataset for phases 1,2,3 (disjoint).")
    if sft_only:
        group.add_argument("--sft_only_data_path", nargs="*", default=[],
                           help="Datasets used entirely for SFT.")
    group.add_argument("--data_output_path", type=str, default="/tmp/data_files/",
                       help="Where the tokenized datasets are cached (node-local storage).")
    group.add_argument("--data_seed", type=int, default=1234,
                       help="Seed of the split and shuffle indices.")
    group.add_argument("--strict_data", action="store_true",
                       help="A row with a missing column or a null / non-string text is an error "
                            "(default: skipped, counted and reported once per dataset).")
    return group


def add_optimization_args(parser, learning_rate, weight_decay=0.0, warmup=0):
    group = parser.add_argument_group("optimization")
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--weight_decay", type=float, default=weight_decay)
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    add_scheduler_args(group, warmup)
    return group


def add_scheduler_args(group, warmup=0):
    group.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine",
                       choices=SCHEDULERS, help="Learning-rate schedule.")
    group.add_argument("--num_warmup_steps", type=int, default=warmup)


def add_runtime_args(parser, seed=2023):
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", type=str, default=None, help="Where to save the model.")
    group.add_argument("--seed", type=int, default=seed)
    group.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    add_nonfinite_args(group)
    return group


def add_zero_args(parser):
    group = parser.add_argument_group("deepspeed")
    group.add_argument("--offload", action="store_true", help="ZeRO CPU offload (+ CPU Adam).")
    group.add_argument("--bf16", action="store_true", help="bf16 instead of the default fp16.")
    group.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--disable_dropout", action="store_true")
    return group


def add_lora_args(parser, prefix=""):
    group = parser.add_argument_group("lora")
    group.add_argument(f"--{prefix}lora_dim", type=int, default=0, help="> 0 enables LoRA.")
    group.add_argument(f"--{prefix}lora_module_name", type=str, default="decoder.layers.",
                       help="Substring of the Linear layers to adapt (OPT: decoder.layers., "
                            "Llama: layers.).")
    group.add_argument("--only_optimize_lora", action="store_true")
    group.add_argument(f"--{prefix}lora_learning_rate", type=float, default=5e-4)
    return group


def add_logging_args(parser, tensorboard_path):
    group = parser.add_argument_group("logging")
    group.add_argument("--enable_tensorboard", action="store_true")
    group.add_argument("--tensorboard_path", type=str, default=tensorboard_path)
    group.add_argument("--print_loss", action="store_true")
    return group


def finish(parser, argv=None, phase=None):
    """Add DeepSpeed's own flags, parse, and check what every stage needs (`check_common_args`;
    `phase`: the stage's part of --data_split, 1, 2 or 3)."""
    import deepspeed

    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("--output_dir is required (the directory the model is saved into)")
    try:
        check_common_args(args, phase)
    except UserError as err:
        parser.error(str(err))
    return args


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error: ...` line printed by rank 0 alone (every rank
    parses the same argv and exits with code 2; argparse printed usage + error on every rank)."""

    def error(self, message):
        exit_with_error(f"{message} (see {self.prog} --help)")


def new_parser(description):
    return ArgumentParser(description=description)


# ----------------------------------------------------------------------------------------------
# Flag checks (no files, no models)
# ----------------------------------------------------------------------------------------------

def parse_data_split(value, flag="--data_split"):
    """[p1, p2, p3] of a --data_split such as "2,4,4": exactly three non-negative numbers with a
    positive sum (the original accepted "2,4" and trained on whatever that produced)."""
    parts = [part.strip() for part in str(value).split(",")]
    try:
        proportions = [float(part) for part in parts]
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected three comma-separated numbers, one per phase, "
                        f"e.g. 2,4,4") from None
    if len(proportions) != 3:
        raise UserError(f"{flag} {value!r}: expected exactly three proportions (phases 1, 2, 3), "
                        f"got {len(proportions)}")
    if any(not math.isfinite(p) or p < 0 for p in proportions):
        raise UserError(f"{flag} {value!r}: proportions must be finite and non-negative")
    if sum(proportions) <= 0:
        raise UserError(f"{flag} {value!r}: the proportions sum to 0")
    return proportions


def check_data_split(args, phase=None):
    """--data_split well formed and, for `phase`, not a zero share (unless SFT-only data feeds it)."""
    proportions = parse_data_split(args.data_split)
    if phase is not None and proportions[phase - 1] == 0 and not (
            phase == 1 and getattr(args, "sft_only_data_path", None)):
        raise UserError(f"--data_split {args.data_split} gives phase {phase} (this stage) no data: "
                        f"its proportion is 0")


def _check_at_least(args, names, minimum=1):
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise UserError(f"--{name} must be at least {minimum}, got {value}")


def check_lora_args(args):
    """A LoRA flag that needs a LoRA dim: --only_optimize_lora with --lora_dim (stage 3:
    --actor_lora_dim) at 0 would train the whole model. (A module name without a dim is harmless
    and scripts pass it; it is not an error.)"""
    for prefix in ("", "actor_", "critic_"):
        dim_flag = f"{prefix}lora_dim"
        if hasattr(args, dim_flag) and getattr(args, dim_flag) < 0:
            raise UserError(f"--{dim_flag} must be >= 0 (0: LoRA off), got {getattr(args, dim_flag)}")
    if getattr(args, "only_optimize_lora", False):
        dim_flag = "lora_dim" if hasattr(args, "lora_dim") else "actor_lora_dim"
        if getattr(args, dim_flag, 0) == 0:
            raise UserError(f"--only_optimize_lora needs --{dim_flag} > 0: with LoRA off there "
                            f"are no LoRA weights, and the whole model would train")


def check_frozen_model_stages(args):
    """A frozen model (stage 3's reference and reward) runs at ZeRO 0 or 3 (1 and 2 fall back to 0,
    as in the original); parameter offload (--offload_*_model) is a ZeRO-3 feature."""
    for name, offload in (("reference", "offload_reference_model"),
                          ("reward", "offload_reward_model")):
        stage_flag = f"{name}_zero_stage"
        if not hasattr(args, stage_flag):
            continue
        stage = getattr(args, stage_flag)
        if stage not in (0, 1, 2, 3):
            raise UserError(f"--{stage_flag} {stage}: ZeRO stages are 0-3, and a frozen model "
                            f"runs at 0 or 3")
        if getattr(args, offload, False) and stage != 3:
            raise UserError(f"--{offload} needs --{stage_flag} 3 (offloading parameters is a "
                            f"ZeRO-3 feature; at stage {stage} nothing would be offloaded)")


def check_offload_stage(args):
    """--offload (ZeRO-Offload: optimizer states on the CPU, stepped by DeepSpeedCPUAdam) needs
    ZeRO 1-3 for the trained model: at ZeRO 0 DeepSpeed keeps the parameters and the optimizer on
    the accelerator, and CPU Adam asserts at the first step."""
    if not getattr(args, "offload", False):
        return
    for stage_flag in ("zero_stage", "actor_zero_stage"):
        if getattr(args, stage_flag, None) == 0:
            raise UserError(f"--offload needs --{stage_flag} 1, 2 or 3: at ZeRO 0 DeepSpeed keeps "
                            f"the optimizer on the accelerator, where the CPU Adam that --offload "
                            f"picks fails at the first step")


def check_rollout_batches(args):
    """Stage 3, once --num_samples_per_prompt is known: each generation batch's experience (prompts
    × samples rows) is cut into micro-batches of --per_device_training_batch_size, so that must
    divide it (a short last micro-batch would weigh its rows more); with the pretraining mix,
    every experience micro-batch is paired with one pretraining micro-batch cut from a batch of
    --per_device_generation_batch_size rows, so both cuttings must give the same count."""
    generation = args.per_device_generation_batch_size
    training = args.per_device_training_batch_size
    samples = args.num_samples_per_prompt or 1
    rows = generation * samples
    if rows % training:
        raise UserError(f"--per_device_training_batch_size {training} does not divide the {rows} "
                        f"experience rows of a generation batch (--per_device_generation_batch_size "
                        f"{generation} x --num_samples_per_prompt {samples})")
    pretraining_micro_batches = math.ceil(generation / training)
    if getattr(args, "unsupervised_dataset_name", None) and pretraining_micro_batches != rows // training:
        raise UserError(f"the pretraining mix pairs each of the {rows // training} experience "
                        f"micro-batches with one of --per_device_generation_batch_size {generation}"
                        f" / --per_device_training_batch_size {training} = "
                        f"{pretraining_micro_batches} pretraining micro-batches; use "
                        f"--num_samples_per_prompt 1 or a training batch covering the experience")


def check_common_args(args, phase=None):
    """Every flag check that needs no file: --data_split, sizes that must be positive, LoRA flags
    without a dim, frozen-model ZeRO stages, --offload at ZeRO 0. `phase`: the stage's part of --data_split."""
    if hasattr(args, "data_split"):
        check_data_split(args, phase)
    _check_at_least(args, ("per_device_train_batch_size", "per_device_eval_batch_size",
                           "gradient_accumulation_steps", "max_seq_len"))
    check_lora_args(args)
    check_frozen_model_stages(args)
    check_offload_stage(args)
    if hasattr(args, "max_nonfinite_updates"):
        _check_at_least(args, ("max_nonfinite_updates",))
        parse_debug_nan_loss(args.debug_nan_loss)


# ----------------------------------------------------------------------------------------------
# File checks (cheap: configs, file names, tokenizers; never a model)
# ----------------------------------------------------------------------------------------------

def check_inputs(args, models=(), reward_models=(), same_tokenizer=False):
    """Check the files the flags name, on every rank, before anything is built or written.

    models: names of flags holding a causal-LM / base model directory (config, weights, tokenizer);
    reward_models: names of flags holding a stage-2 output directory;
    same_tokenizer: the tokenizers of all those directories must agree (stage 3);
    and every --data_path / --sft_only_data_path must be a dataset directory we can read.
    """
    from utils.data.raw_datasets import check_dataset_path
    from utils.model.model_utils import check_model_dir, check_same_tokenizer
    from utils.model.reward_model import check_reward_model_dir

    for name in models:
        check_model_dir(getattr(args, name), f"--{name}")
    for name in reward_models:
        check_reward_model_dir(getattr(args, name), f"--{name}")
    for name in ("data_path", "sft_only_data_path"):
        for path in getattr(args, name, None) or ():
            check_dataset_path(path, f"--{name}")
    if same_tokenizer:
        check_same_tokenizer({f"--{name}": getattr(args, name) for name in (*models, *reward_models)})
