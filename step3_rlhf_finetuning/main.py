"""Stage 3: RLHF — ReMax (REINFORCE with the greedy answer's reward as the baseline) and, in the
same engine, the baselines users compare it with: PPO (DeepSpeed-Chat's, with a critic), RLOO, GRPO.

    deepspeed main.py --algo remax --actor_model_name_or_path ./step1_output \
        --reward_model_name_or_path ./step2_output --data_path /data/Dahoas/rm-static \
        --actor_zero_stage 2 --reward_zero_stage 3 --reference_zero_stage 3 --output_dir ./output
"""
import argparse
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import default_data_collator  # noqa: E402

from algorithms import ALGORITHMS, AlgorithmSettings  # noqa: E402
from evaluation import evaluate_policy  # noqa: E402
from rlhf_engine import RLHFEngine  # noqa: E402
from rounds import StepLog, make_schedule, run_update, training_rounds, update_flops  # noqa: E402
from train_state import TrainState  # noqa: E402
from trainer import PolicyTrainer, RolloutSettings  # noqa: E402
from utils import arguments  # noqa: E402
from utils.checkpoint import (Checkpointer, add_checkpoint_args, export_atomic,  # noqa: E402
                              load_training_checkpoint, mark_run_complete, prepare_output_dir)
from utils.data.data_utils import (DataCollatorRLHF, create_prompt_dataset,  # noqa: E402
                                   get_unsupervised_data)
from utils.errors import UserError, run_main  # noqa: E402
from utils.model.model_utils import (load_hf_tokenizer, save_hf_format,  # noqa: E402
                                     save_reward_model, unwrap)
from utils.nonfinite import NonFiniteUpdates, parse_debug_nan_loss, settle_update  # noqa: E402
from utils.training import MetricsLog, interval, make_loader, record_run  # noqa: E402
from utils.preflight import start_checked  # noqa: E402
from utils.utils import print_rank_0, set_random_seed  # noqa: E402


def parse_args(argv=None):
    parser = arguments.new_parser("Stage 3: RLHF with ReMax (or PPO, RLOO, GRPO)")
    parser.add_argument("--algo", type=str, default="remax", choices=sorted(ALGORITHMS),
                        help="remax: greedy-baseline REINFORCE; ppo: DeepSpeed-Chat's PPO with a "
                             "critic; rloo: leave-one-out baseline; grpo: group-normalised.")
    parser.add_argument("--num_samples_per_prompt", type=int, default=None,
                        help="Sampled answers per prompt (default: 1 for remax and ppo, 2 for rloo "
                             "and grpo; ReMax's k samples share one greedy baseline).")
    arguments.add_data_args(parser)
    parser.add_argument("--unsupervised_dataset_name", type=str, default=None,
                        help="A local corpus (file or directory) for the pretraining mix.")
    parser.add_argument("--unsupervised_dataset_config_name", type=str, default=None)
    parser.add_argument("--unsup_coef", type=float, default=27.8)
    parser.add_argument("--actor_model_name_or_path", type=str, required=True)
    parser.add_argument("--reward_model_name_or_path", type=str, required=True)
    parser.add_argument("--num_padding_at_beginning", type=int, default=1)
    parser.add_argument("--per_device_generation_batch_size", type=int, default=16)
    parser.add_argument("--per_device_training_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--generation_batches", type=int, default=1,
                        help="Prompt batches whose experience makes one actor update.")
    parser.add_argument("--ppo_epochs", type=int, default=1,
                        help="Passes (optimizer steps) over each update's experience.")
    parser.add_argument("--max_prompt_seq_len", type=int, default=256)
    parser.add_argument("--max_answer_seq_len", type=int, default=256)
    parser.add_argument("--actor_learning_rate", type=float, default=9.65e-6)
    parser.add_argument("--actor_weight_decay", type=float, default=0.0)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    group = parser.add_argument_group("schedule")
    arguments.add_scheduler_args(group, warmup=100)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    arguments.add_runtime_args(parser, seed=None)
    parser.add_argument("--preprocessing_num_workers", type=int, default=None)
    # DeepSpeed
    parser.add_argument("--enable_hybrid_engine", action="store_true")
    parser.add_argument("--unpin_actor_parameters", action="store_true")
    parser.add_argument("--release_inference_cache", action="store_true")
    parser.add_argument("--memory_efficient_linear", action="store_true")
    parser.add_argument("--inference_tp_size", type=int, default=1)
    parser.add_argument("--tp_gather_partition_size", type=int, default=8)
    parser.add_argument("--offload", action="store_true")
    group = parser.add_argument_group("efficiency (each on by default; these switch one off)")
    group.add_argument("--separate_baseline_generation", action="store_true",
                       help="Decode the greedy baselines in a second pass instead of beside the "
                            "sampled answers in one batched pass.")
    group.add_argument("--separate_baseline_scoring", action="store_true",
                       help="Score sampled and greedy answers in two reward-model forwards.")
    group.add_argument("--separate_scoring_forward", action="store_true",
                       help="Score the policy in its own no-grad forward instead of inside the "
                            "update forward (that needs --ppo_epochs 1 and --disable_actor_dropout).")
    group.add_argument("--unchunked_logits", action="store_true",
                       help="Compute actor and reference logits over all answer positions at once "
                            "([batch, answer, vocabulary], kept for the backward) instead of "
                            "--logit_chunk_mib of them at a time.")
    group.add_argument("--logit_chunk_mib", type=float, default=128,
                       help="Float32 logits per chunk of the LM head and the log-prob / entropy / "
                            "KL computation, in MiB (default 128: 1024 answer tokens at a "
                            "vocabulary of 32768; the chunk's temporaries take a few times that); "
                            "with grad and more than one chunk, each is recomputed in the "
                            "backward.")
    group.add_argument("--hf_sampling", action="store_true",
                       help="Sample with Hugging Face's top-k / top-p warpers over the whole "
                            "vocabulary instead of over the top-k candidates only (the same "
                            "distribution).")
    group.add_argument("--pad_prompts_to_max_len", action="store_true",
                       help="Keep every prompt batch padded to --max_prompt_seq_len (default: to "
                            "the batch's longest prompt).")
    group.add_argument("--per_layer_generation_gather", action="store_true",
                       help="With a ZeRO-3 actor, let ZeRO-3 gather and release each module's "
                            "parameters at every decoded token (every rank decoding in lockstep) "
                            "instead of gathering the whole actor once per generate call, which "
                            "happens only when it fits in the free accelerator memory.")
    parser.add_argument("--half_precision_logits", action="store_true",
                        help="Compute the actor's and reference's LM-head logits in the engine's "
                             "fp16/bf16 (the original) instead of float32 (the default: half "
                             "logits round the per-token log-ratios to about 0.016).")
    parser.add_argument("--offload_reference_model", action="store_true")
    parser.add_argument("--offload_reward_model", action="store_true")
    parser.add_argument("--actor_bf16", action="store_true")
    parser.add_argument("--reward_bf16", action="store_true",
                        help="bf16 for the reward model and, with --algo ppo, the critic (it is "
                             "initialised from a reward model; --actor_bf16 covers the actor and "
                             "the reference only). Default: fp16 on CUDA, fp32 elsewhere.")
    parser.add_argument("--actor_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--reward_zero_stage", type=int, default=0)
    parser.add_argument("--reference_zero_stage", type=int, default=0)
    parser.add_argument("--actor_gradient_checkpointing", action="store_true")
    parser.add_argument("--disable_actor_dropout", action="store_true")
    parser.add_argument("--disable_reward_dropout", action="store_true")
    add_critic_args(parser)
    # the algorithms
    parser.add_argument("--gamma", type=float, default=None,
                        help="Discount (default: 0.95 for remax and rloo, 1.0 for ppo and grpo).")
    parser.add_argument("--lam", type=float, default=0.95, help="GAE λ (ppo).")
    parser.add_argument("--cliprange", type=float, default=0.2, help="Ratio clip ε (ppo, grpo).")
    parser.add_argument("--cliprange_value", type=float, default=0.2, help="Value clip (ppo).")
    parser.add_argument("--kl_loss_coef", type=float, default=0.04,
                        help="Coefficient of GRPO's KL-to-reference loss term.")
    parser.add_argument("--penalty", type=str, default="kl",
                        choices=["kl", "full_kl", "kl_onestep", "full_kl_onestep"],
                        help="Unused, as in the original: the penalty is the per-token log-ratio.")
    parser.add_argument("--kl_ctl", type=float, default=0.1, help="β of the per-token KL penalty.")
    parser.add_argument("--target_kl", type=float, default=1.0,
                        help="Stop training when the evaluation KL reaches this.")
    parser.add_argument("--save_at_final", action="store_true")
    parser.add_argument("--normalize_kl", action="store_true", help="Unused, as in the original.")
    parser.add_argument("--entropy_coef", type=float, default=0.0,
                        help="Unused, as in the original (entropy is only logged).")
    parser.add_argument("--clip_reward_value", type=float, default=5.0,
                        help="The score (minus the baseline) is clipped to ±this (remax, rloo, ppo).")
    # LoRA, EMA, logging
    arguments.add_lora_args(parser, prefix="actor_")
    parser.add_argument("--enable_ema", action="store_true")
    parser.add_argument("--enable_mixed_precision_lora", action="store_true")
    parser.add_argument("--enable_tensorboard", action="store_true")
    parser.add_argument("--tensorboard_path", type=str, default="step3_tensorboard")
    parser.add_argument("--print_answers", action="store_true")
    parser.add_argument("--save_answers", action="store_true")
    parser.add_argument("--dump_first_experience", action="store_true",
                        help="Write the first update's experience micro-batches to "
                             "<output_dir>/experience/step_0_rank_<r>.pt (to check the math).")
    # Tests: "UPDATE@RANK,..." gives that rank's rollout of that update an +inf logit.
    parser.add_argument("--debug_nan_logits", type=str, default="", help=argparse.SUPPRESS)
    parser.add_argument("--enable_test_mode", action="store_true")
    parser.add_argument("--test_stop_step", type=int, default=0)
    parser.add_argument("--evals_per_epoch", type=int, default=20,
                        help="Policy evaluations per epoch (the original's 20).")
    parser.add_argument("--eval_batches", type=int, default=20,
                        help="Prompt batches per rank in each reward evaluation (the original's 20).")
    parser.add_argument("--ppl_eval_batches", type=int, default=100)
    add_checkpoint_args(parser)
    args = arguments.finish(parser, argv, phase=3)
    check_args(parser, args)
    return args


def add_critic_args(parser):
    """PPO's critic, with DeepSpeed-Chat's flag names (ignored by the other algorithms)."""
    group = parser.add_argument_group("critic (ppo)")
    group.add_argument("--critic_model_name_or_path", type=str, default=None,
                       help="A reward-model checkpoint to start the critic from (default: the "
                            "reward model).")
    group.add_argument("--critic_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    group.add_argument("--critic_learning_rate", type=float, default=5e-6)
    group.add_argument("--critic_weight_decay", type=float, default=0.0)
    group.add_argument("--critic_gradient_checkpointing", action="store_true")
    group.add_argument("--critic_lora_dim", type=int, default=0)
    group.add_argument("--critic_lora_module_name", type=str, default="decoder.layers.")
    group.add_argument("--critic_lora_learning_rate", type=float, default=5e-4)
    group.add_argument("--disable_critic_dropout", action="store_true")


def check_args(parser, args):
    """Flag checks that need no model; fills the per-algorithm defaults."""
    algorithm = ALGORITHMS[args.algo]
    if args.num_samples_per_prompt is None:
        args.num_samples_per_prompt = algorithm.rollout.samples
    if args.num_samples_per_prompt < algorithm.rollout.min_samples:
        parser.error(f"--algo {args.algo} needs --num_samples_per_prompt >= "
                     f"{algorithm.rollout.min_samples}, got {args.num_samples_per_prompt}")
    if args.gamma is None:
        args.gamma = algorithm.gamma
    if args.critic_model_name_or_path is None:
        args.critic_model_name_or_path = args.reward_model_name_or_path
    for flag in ("ppo_epochs", "generation_batches", "per_device_generation_batch_size",
                 "per_device_training_batch_size", "per_device_eval_batch_size",
                 "max_answer_seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.logit_chunk_mib > 0:
        parser.error(f"--logit_chunk_mib must be positive, got {args.logit_chunk_mib}")
    if args.gradient_accumulation_steps != 1:
        parser.error("--gradient_accumulation_steps must be 1 in stage 3 (use --generation_batches)")
    if args.offload and algorithm.critic and args.critic_zero_stage == 0:
        parser.error(f"--offload with --algo {args.algo} needs --critic_zero_stage 1, 2 or 3 (it "
                     "offloads the critic's optimizer too, and at ZeRO 0 DeepSpeed keeps the "
                     "optimizer on the accelerator, where the CPU Adam --offload picks fails)")
    parse_debug_nan_loss(args.debug_nan_logits)
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        parser.error("--inference_tp_size > 1 needs --actor_zero_stage 3")
    if args.enable_mixed_precision_lora and (args.actor_lora_dim == 0 or args.actor_zero_stage != 3):
        parser.error("--enable_mixed_precision_lora needs --actor_lora_dim > 0 and actor ZeRO 3")
    # As the original, the pretraining mix needs both flags; one alone is an error, not ignored.
    if bool(args.unsupervised_dataset_name) != bool(args.unsupervised_dataset_config_name):
        parser.error("the pretraining mix needs both --unsupervised_dataset_name and "
                     "--unsupervised_dataset_config_name")
    if args.unsupervised_dataset_name and not os.path.exists(args.unsupervised_dataset_name):
        parser.error(f"--unsupervised_dataset_name {args.unsupervised_dataset_name} does not exist "
                     "(a local file or directory; nothing is downloaded)")
    try:
        arguments.check_rollout_batches(args)
    except UserError as err:
        parser.error(str(err))


def check_input_files(args, algorithm):
    """The directories the flags name, on every rank, before anything is built or written: the
    actor, the reward model (and critic) in their layouts, sharing one tokenizer; the datasets."""
    reward_models = ["reward_model_name_or_path"]
    if algorithm.critic:
        reward_models.append("critic_model_name_or_path")
    arguments.check_inputs(args, models=["actor_model_name_or_path"],
                           reward_models=reward_models, same_tokenizer=True)


def create_datasets(args, tokenizer, world_size):
    """Prompt loaders (train, eval), the perplexity loader and the optional pretraining loader."""
    prompt_train, prompt_eval = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, 3, args.data_seed,
        tokenizer, args.max_prompt_seq_len, end_of_conversation_token=tokenizer.eos_token,
        strict_data=args.strict_data)
    _, ppl_eval = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, 1, args.data_seed,
        tokenizer, args.max_prompt_seq_len, end_of_conversation_token=tokenizer.eos_token,
        strict_data=args.strict_data, required=("eval",))
    distributed = world_size > 1
    collator = DataCollatorRLHF(args.max_prompt_seq_len, args.inference_tp_size)
    # Full prompt batches only, so every update accumulates the same number of micro-batches.
    train_loader = make_loader(prompt_train, args.per_device_generation_batch_size, collator,
                               shuffle=True, distributed=distributed, seed=args.data_seed,
                               drop_last=True)
    eval_loader = make_loader(prompt_eval, args.per_device_generation_batch_size, collator,
                              shuffle=False, distributed=distributed)
    ppl_loader = make_loader(ppl_eval, args.per_device_eval_batch_size, default_data_collator,
                             shuffle=False, distributed=distributed)
    unsup_loader = None
    if args.unsupervised_dataset_name:
        unsup = get_unsupervised_data(args, tokenizer)
        unsup_loader = make_loader(unsup, args.per_device_generation_batch_size,
                                   default_data_collator, shuffle=True, distributed=distributed,
                                   seed=args.data_seed, drop_last=True)
    if len(train_loader) < args.generation_batches:
        raise UserError(f"only {len(train_loader)} full prompt batches per rank; --generation_"
                        f"batches {args.generation_batches} needs more prompts")
    return train_loader, eval_loader, ppl_loader, unsup_loader


def algorithm_settings(args):
    return AlgorithmSettings(gamma=args.gamma, lam=args.lam, kl_ctl=args.kl_ctl,
                             clip_reward_value=args.clip_reward_value, cliprange=args.cliprange,
                             cliprange_value=args.cliprange_value, kl_loss_coef=args.kl_loss_coef,
                             group_size=args.num_samples_per_prompt)


# Model types whose causal-LM forward returns the LM head's output unchanged (checked in their
# transformers 5 code), so the chunked path may run the head itself. Others (Gemma's soft-capping,
# Cohere's logit scale, Granite's scaling) keep the full logits.
PLAIN_LM_HEAD_TYPES = frozenset({"opt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox",
                                 "phi3"})


def logit_chunk_tokens(args, config):
    """Answer tokens per LM-head chunk: --logit_chunk_mib of float32 logits at the actor's
    vocabulary (None: unchunked, also for a model type that changes the head's output)."""
    if args.unchunked_logits:
        return None
    if config.model_type not in PLAIN_LM_HEAD_TYPES:
        print_rank_0(f"[scoring] full logits: a {config.model_type} model's forward may change its "
                     "LM head's output, which the chunked computation would skip")
        return None
    return max(1, int(args.logit_chunk_mib * 2 ** 20 // (4 * config.vocab_size)))


def rollout_settings(args, world_size, hybrid_engine, actor_config):
    one_pass = not args.separate_baseline_generation
    if one_pass and hybrid_engine and ALGORITHMS[args.algo].rollout.greedy_baseline:
        # Its generate has not been checked with a per-row logits processor: keep two passes.
        print_rank_0("[generation] hybrid engine on: sampled and greedy answers are decoded in "
                     "two passes")
        one_pass = False
    return RolloutSettings(max_answer_seq_len=args.max_answer_seq_len,
                           num_samples_per_prompt=args.num_samples_per_prompt,
                           ppo_epochs=args.ppo_epochs, unsup_coef=args.unsup_coef,
                           synced_gpus=args.actor_zero_stage == 3 and world_size > 1,
                           one_generation_pass=one_pass,
                           one_reward_pass=not args.separate_baseline_scoring,
                           trim_prompt_padding=not args.pad_prompts_to_max_len,
                           one_actor_forward=one_actor_forward(args),
                           logit_chunk_tokens=logit_chunk_tokens(args, actor_config),
                           fused_sampling=not args.hf_sampling,
                           gather_once_for_generation=not (args.per_layer_generation_gather
                                                           or hybrid_engine),
                           fp32_logits=not args.half_precision_logits)


def one_actor_forward(args):
    """Whether the update forward can also score the policy: its log-probs then equal a separate
    scoring forward's only with one pass over the experience and no actor dropout, and the
    estimator sees whole prompt groups only when micro-batches hold whole groups."""
    if args.separate_scoring_forward:
        return False
    reasons = [why for why, applies in (
        ("--ppo_epochs > 1", args.ppo_epochs > 1),
        ("actor dropout is on (pass --disable_actor_dropout)", not args.disable_actor_dropout),
        ("--per_device_training_batch_size is not a multiple of --num_samples_per_prompt",
         args.per_device_training_batch_size % args.num_samples_per_prompt != 0)) if applies]
    if reasons:
        print_rank_0(f"[scoring] a separate no-grad forward scores the policy: {'; '.join(reasons)}")
    return not reasons


def save_checkpoint(checkpointer, state, metrics):
    """Save the loop's checkpoint now (a non-finite streak's stop) and close; returns its path."""
    state.metrics_lines = metrics.lines
    path = checkpointer.save(state.global_step, state.to_dict(), state.last_eval)
    checkpointer.close()
    return path


def save_models(engine, tokenizer, args):
    """The actor (and EMA) in the Hugging Face layout; PPO's critic in the reward-model layout,
    which rw_eval.py and a later stage 3 read. Each export is atomic file by file."""
    print_rank_0("saving model ...")
    exports = {"actor": lambda d: save_hf_format(engine.actor, tokenizer, d)}
    if engine.actor_ema is not None:
        exports["actor_ema"] = lambda d: save_hf_format(engine.actor_ema, tokenizer, d)
    if engine.critic is not None:
        exports["critic"] = lambda d: save_reward_model(engine.critic, tokenizer, d,
                                                        args.num_padding_at_beginning)
    for name, write in exports.items():
        export_atomic(ensure_dir(os.path.join(args.output_dir, name)), write)


def ensure_dir(path):
    os.makedirs(path, exist_ok=True)
    return path


def evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device):
    report = evaluate_policy(trainer, eval_loader, ppl_loader, args, state.global_step, device)
    print_rank_0(" | ".join(f"eval {k}: {v:.4f}" for k, v in report.items()))
    scalars = {f"eval/{k}": v for k, v in report.items()}
    metrics.log(state.global_step, epoch=state.epoch, **scalars)
    state.last_eval_kl = report["kl"]
    state.last_eval = {"step": state.global_step, **scalars}
    return report


def evaluate_and_save_best(trainer, engine, tokenizer, eval_loader, ppl_loader, args, state,
                           metrics, device):
    print_rank_0(f"***** Evaluating policy, Epoch {state.epoch + 1}/{args.num_train_epochs} "
                 f"Step {state.global_step} *****")
    report = evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device)
    if state.is_best(report["reward"]):
        save_models(engine, tokenizer, args)


def evaluate_and_save_final(trainer, engine, tokenizer, eval_loader, ppl_loader, args, state,
                            metrics, device):
    """The original's final rule: evaluate unless early-stopped (or --save_at_final), save if best."""
    if state.early_stopped and not args.save_at_final:
        return
    print_rank_0("***** Evaluating at final *****")
    report = evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device)
    # The original compared with None here when no periodic evaluation had run (TypeError).
    if state.is_best(report["reward"]) or args.save_at_final:
        save_models(engine, tokenizer, args)


def evaluation_due(state, eval_every):
    return state.global_step % eval_every == 0


def should_stop(state, args):
    """Early stop on the all-reduced eval KL (the original broke only the inner loop), or the
    test-mode step count."""
    if state.last_eval_kl is not None and state.last_eval_kl >= args.target_kl:
        print_rank_0(f"**** Early stop at {state.global_step} due to KL = {state.last_eval_kl} "
                     f"> Target KL ({args.target_kl}) ****")
        state.early_stopped = True
        return True
    return args.enable_test_mode and state.non_overflow_steps == args.test_stop_step


def main():
    args = parse_args()
    algorithm = ALGORITHMS[args.algo]
    if args.enable_tensorboard:
        args.tensorboard_path = args.output_dir
    device, args.global_rank, world_size = start_checked(
        args, lambda: check_input_files(args, algorithm))
    resume = prepare_output_dir(args, world_size)   # the finished-run guard, or the resume plan
    set_random_seed(args.seed)  # a resume's RNG is restored later, right before its first update
    record_run(args)

    tokenizer = load_hf_tokenizer(args.actor_model_name_or_path)
    train_loader, eval_loader, ppl_loader, unsup_loader = create_datasets(args, tokenizer,
                                                                          world_size)
    schedule = make_schedule(args, args.num_samples_per_prompt, train_loader, unsup_loader)
    engine = RLHFEngine(args, tokenizer, schedule.optimizer_steps, schedule.micro_batches,
                        world_size, with_critic=algorithm.critic,
                        universal=resume is not None and resume.universal)
    if args.enable_mixed_precision_lora:
        engine.actor.optimizer.quantize_nontrainable_params()
        print_rank_0("Mixed Precision ZeRO++ enabled")
    state = TrainState.new(args, world_size, resume)
    guard = NonFiniteUpdates(args.max_nonfinite_updates, state.nonfinite_streak,
                             state.nonfinite_skipped, state.overflow_skipped, args.debug_nan_loss)
    trainer = PolicyTrainer(engine, algorithm, algorithm_settings(args),
                            rollout_settings(args, world_size, engine.hybrid_engine,
                                             unwrap(engine.actor).config), guard,
                            parse_debug_nan_loss(args.debug_nan_logits))
    if resume is not None:
        load_training_checkpoint(resume, engine.trained_engines())
    checkpointer = Checkpointer(args.output_dir, engine.trained_engines(), args, "eval/reward",
                                higher_is_better=True,
                                resumed_step=resume.step if resume else None)
    metrics = MetricsLog(args.output_dir, args.enable_tensorboard, keep_lines=state.metrics_lines)
    log_step = StepLog(args, metrics, world_size,
                       update_flops(args, unwrap(engine.actor).config, args.num_samples_per_prompt,
                                    algorithm.rollout.greedy_baseline, world_size),
                       schedule.total_updates)
    eval_every = interval(schedule.updates_per_epoch, args.evals_per_epoch)

    baseline = " + greedy baseline" if algorithm.rollout.greedy_baseline else ""
    print_rank_0(f"***** Running training: {args.algo}, {args.num_samples_per_prompt} sampled "
                 f"answer(s) per prompt{baseline} *****")
    if resume is None:
        print_rank_0(f"***** Evaluating policy, Epoch 1/{args.num_train_epochs} *****")
        evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device)
    for prompt_batches, unsup_batches in training_rounds(train_loader, unsup_loader, args,
                                                         schedule.updates_per_epoch, state,
                                                         resume):
        guard.begin_update(state.global_step)
        means, seconds = run_update(trainer, prompt_batches, unsup_batches, args, state, device,
                                    world_size)
        log_step(means, seconds, state)
        # The same on every rank (decided on all-reduced values); a streak saves and stops.
        settle_update(guard, state.global_step, metrics, "train",
                      lambda applied, counters: state.count_update(applied, **counters),
                      lambda: save_checkpoint(checkpointer, state, metrics))
        if evaluation_due(state, eval_every):
            evaluate_and_save_best(trainer, engine, tokenizer, eval_loader, ppl_loader, args,
                                   state, metrics, device)
        if should_stop(state, args):
            break
        state.metrics_lines = metrics.lines
        if checkpointer.step_end(state.global_step, state.to_dict(), state.last_eval):
            metrics.close()
            return  # saved on SIGTERM (or --stop_after_steps): continue with --resume
    evaluate_and_save_final(trainer, engine, tokenizer, eval_loader, ppl_loader, args, state,
                            metrics, device)
    state.metrics_lines = metrics.lines
    checkpointer.save(state.global_step, state.to_dict(), state.last_eval)
    checkpointer.close()
    metrics.close()
    mark_run_complete(args.output_dir, {"stage": f"rlhf-{args.algo}", "step": state.global_step,
                                        "best_eval_reward": state.best_eval_reward})
    print_rank_0(f"done: {state.global_step} updates; best eval reward {state.best_eval_reward}")

if __name__ == "__main__":
    run_main(main)
