"""The stage-3 models, one DeepSpeed engine each: actor (trained), reference (frozen SFT copy),
reward (frozen stage-2 model), the optional EMA of the actor and, for PPO only, the critic (trained,
initialised from the reward model). ReMax, RLOO and GRPO build no value model.

Only the trained models have gradients and optimizer states, so ZeRO 1/2 mean nothing for the
frozen ones: they run at ZeRO 0 or, to save memory, ZeRO 3 (partitioning, optionally offloaded).
"""
import time

import torch
from transformers import AutoModelForCausalLM

from utils.checkpoint import universal_ds_config
from utils.ds_utils import (get_eval_ds_config, get_train_ds_config, resolve_hybrid_engine,
                            set_batch_sizes)
from utils.model.model_utils import (check_tokenizer_contract, create_critic_model, create_hf_model,
                                     unwrap)
from utils.module.lora import apply_lora, gathered_parameters
from utils.training import init_eval_engine, init_train_engine
from utils.utils import print_rank_0


def _banner(text):
    print_rank_0(f" {text} ".center(90, "*"))


def critic_ds_config(args):
    """PPO's critic: initialised from the reward model, so in the reward model's precision
    (--reward_bf16; DeepSpeed-Chat's one dtype flag covers every model, --actor_bf16 is the
    actor's). The rest as the actor's: --offload, its own --critic_zero_stage."""
    return get_train_ds_config(offload=args.offload, stage=args.critic_zero_stage,
                               enable_tensorboard=args.enable_tensorboard, bf16=args.reward_bf16,
                               tb_path=args.tensorboard_path, tb_name="")


def frozen_actor_copy_ds_config(args, ema=False):
    """The reference (in the actor's precision) or the EMA copy of the actor (`ema`): float32
    whatever the actor's precision, as many of the EMA's 0.008·(θ − ema) steps round away in bf16
    (a bf16 EMA covers about half of the way the formula's 500 steps cover, test_rlhf_engine.py).
    Both at --reference_zero_stage, offloaded with --offload_reference_model."""
    stage = frozen_model_stage(args.reference_zero_stage, "EMA" if ema else "reference")
    if ema:
        return get_eval_ds_config(args.offload_reference_model, stage, precision="fp32")
    return get_eval_ds_config(args.offload_reference_model, stage, bf16=args.actor_bf16)


def frozen_model_stage(requested, name):
    """ZeRO stage of a frozen model: 3 stays 3, anything else runs at 0."""
    if requested in (0, 3):
        return requested
    print_rank_0(f"It is useless to set stage = {requested} for the {name} model (no optimizer "
                 "states or gradients); running it at stage 0")
    return 0


class RLHFEngine:
    """Builds actor, reference, reward (EMA, critic) engines from the parsed stage-3 arguments.

    num_total_iters: optimizer steps of the whole run (the LR schedule's horizon);
    micro_batches: micro-batches whose gradients make one optimizer step (actor, critic), and the
    actor's again with the pretraining mix.
    """

    def __init__(self, args, tokenizer, num_total_iters, micro_batches, world_size, with_critic,
                 universal=False):
        self.args = args
        self.universal = universal  # a resume on another number of ranks (DeepSpeed's universal)
        self.tokenizer = tokenizer
        self.world_size = world_size
        self.micro_batches = micro_batches
        self.actor = self._timed("Actor", lambda: self._init_actor(num_total_iters))
        self.ref = self._timed("Ref", self._init_ref)
        self.actor_ema = self._timed("EMA", self._init_ema) if args.enable_ema else None
        self.critic = self._timed("Critic", lambda: self._init_critic(num_total_iters)) \
            if with_critic else None
        self.reward = self._timed("Reward", self._init_reward)

    def trained_engines(self):
        """What a resumable checkpoint holds: the trained engines and the EMA copy."""
        engines = {"actor": self.actor, "critic": self.critic, "ema": self.actor_ema}
        return {name: engine for name, engine in engines.items() if engine is not None}

    @staticmethod
    def _timed(name, build):
        start = time.time()
        _banner(f"[start] Initializing {name} Model [start]")
        engine = build()
        _banner(f"[end] Initialized {name} Model [end] (duration: {time.time() - start:.2f}s)")
        return engine

    def _batch_sizes(self, config, gradient_accumulation_steps):
        if self.universal:
            config["checkpoint"] = universal_ds_config(config)["checkpoint"]
        return set_batch_sizes(config, self.args.per_device_training_batch_size, self.world_size,
                               gradient_accumulation_steps)

    def _init_actor(self, num_total_iters):
        args = self.args
        self.hybrid_engine = resolve_hybrid_engine(args.enable_hybrid_engine,
                                                   model_path=args.actor_model_name_or_path)
        config = get_train_ds_config(
            offload=args.offload, stage=args.actor_zero_stage,
            enable_hybrid_engine=self.hybrid_engine,
            inference_tp_size=args.inference_tp_size,
            release_inference_cache=args.release_inference_cache,
            pin_parameters=not args.unpin_actor_parameters,
            tp_gather_partition_size=args.tp_gather_partition_size,
            max_out_tokens=args.max_prompt_seq_len + args.max_answer_seq_len,
            enable_tensorboard=args.enable_tensorboard,
            enable_mixed_precision_lora=args.enable_mixed_precision_lora, bf16=args.actor_bf16,
            memory_efficient_linear=args.memory_efficient_linear,
            tb_path=args.tensorboard_path, tb_name="")
        self._batch_sizes(config, self.micro_batches.actor)
        model = create_hf_model(AutoModelForCausalLM, args.actor_model_name_or_path,
                                self.tokenizer, config, disable_dropout=args.disable_actor_dropout)
        check_tokenizer_contract(self.tokenizer, model.config, "actor")
        return self._trained_engine(model, "actor", config, num_total_iters)

    def _init_critic(self, num_total_iters):
        """PPO's value model: a reward-model-layout checkpoint (by default the reward model itself)
        trained with its own engine, flags named as in DeepSpeed-Chat."""
        args = self.args
        config = critic_ds_config(args)
        self._batch_sizes(config, self.micro_batches.critic)
        model = create_critic_model(args.critic_model_name_or_path, self.tokenizer, config,
                                    args.num_padding_at_beginning, rlhf_training=True,
                                    disable_dropout=args.disable_critic_dropout)
        return self._trained_engine(model, "critic", config, num_total_iters)

    def _trained_engine(self, model, who, config, num_total_iters):
        """LoRA, optimizer, LR schedule and gradient checkpointing of a trained model, from the
        `--<who>_*` flags (who: "actor" or "critic")."""
        args = self.args
        flag = lambda name: getattr(args, f"{who}_{name}")  # noqa: E731
        apply_lora(model, flag("lora_dim"), flag("lora_module_name"), args.only_optimize_lora,
                   flag_name=f"--{who}_lora_module_name")
        engine = init_train_engine(model, args, config, flag("learning_rate"),
                                   flag("weight_decay"), flag("lora_learning_rate"),
                                   num_total_iters, args.lr_scheduler_type, args.num_warmup_steps)
        # Once for the run: it acts only on training forwards with gradients (the original switched
        # it on and off at every update, and each switch-on adds a hook in transformers 5).
        if flag("gradient_checkpointing"):
            unwrap(engine).gradient_checkpointing_enable()
        return engine

    def _frozen_actor_copy(self, lora, ema=False):
        args = self.args
        config = frozen_actor_copy_ds_config(args, ema)
        self._batch_sizes(config, self.micro_batches.actor)
        model = create_hf_model(AutoModelForCausalLM, args.actor_model_name_or_path,
                                self.tokenizer, config)
        if lora:
            apply_lora(model, args.actor_lora_dim, args.actor_lora_module_name,
                       flag_name="--actor_lora_module_name")
        return init_eval_engine(model, config)

    def _init_ref(self):
        return self._frozen_actor_copy(lora=False)

    def _init_ema(self):
        # Same structure as the actor (LoRA included) so parameters pair up one to one; float32.
        return self._frozen_actor_copy(lora=True, ema=True)

    def _init_reward(self):
        args = self.args
        stage = frozen_model_stage(args.reward_zero_stage, "reward")
        config = get_eval_ds_config(args.offload_reward_model, stage, bf16=args.reward_bf16)
        self._batch_sizes(config, args.gradient_accumulation_steps)
        model = create_critic_model(args.reward_model_name_or_path, self.tokenizer, config,
                                    args.num_padding_at_beginning, rlhf_training=True,
                                    disable_dropout=args.disable_reward_dropout)
        return init_eval_engine(model, config)


@torch.no_grad()
def moving_average(model, model_ema, beta=0.992):
    """EMA of the actor, DeepSpeed-Chat's rule: ema <- beta * ema + (1 - beta) * param, computed in
    the EMA's dtype (float32 in stage 3, `frozen_actor_copy_ds_config`) from the actor's parameter.

    ZeRO-3 aware: the actor parameter is gathered read-only, the EMA parameter with modifier rank 0,
    whose update DeepSpeed re-partitions on exit (a gather without a modifier rank would drop it).
    """
    params = list(unwrap(model).parameters())
    ema_params = list(unwrap(model_ema).parameters())
    if len(params) != len(ema_params):
        raise RuntimeError("the EMA model's parameters do not pair up with the actor's")
    for param, ema in zip(params, ema_params):
        with gathered_parameters([param]), gathered_parameters([ema], modifier_rank=0):
            ema.data.copy_(torch.lerp(param.data.to(ema.dtype), ema.data, beta))
