"""Command-line flags shared by the stages, defined once. Names and defaults are the original's."""
import argparse

from transformers import SchedulerType

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


def finish(parser, argv=None):
    """Add DeepSpeed's own flags, parse, and check what every stage needs."""
    import deepspeed

    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("--output_dir is required (the directory the model is saved into)")
    return args


def new_parser(description):
    return argparse.ArgumentParser(description=description)
