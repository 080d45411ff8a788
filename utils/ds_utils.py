"""DeepSpeed config builders: pure functions returning dicts, plus accelerator look-ups.

The builders reproduce the original's configs field for field. Two deliberate differences, both for
accelerators other than CUDA: the precision falls back to fp32 (DeepSpeed's CPU accelerator cannot train
in fp16), and the hybrid engine is switched off with one warning (its inference kernels are CUDA-only).
On CUDA the hybrid engine is also switched off, with one warning, for a model whose decoder layers do
not follow the tuple contract of DeepSpeed's injected layers (utils/hybrid_engine_check.py).
"""
import logging

logger = logging.getLogger(__name__)

# Placeholders, as in the original; callers overwrite both with `set_batch_sizes`.
GLOBAL_BATCH_SIZE = 32
MICRO_BATCH_SIZE = 4

PRECISIONS = ("fp16", "bf16", "fp32")

_logged_once = set()


def log_once_on_rank_0(message: str, level: int = logging.INFO) -> None:
    """Log `message` once per process, and only on global rank 0 (or when not distributed)."""
    import torch.distributed as dist

    if message in _logged_once:
        return
    _logged_once.add(message)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    logger.log(level, message)


def current_accelerator_name() -> str:
    """'cuda', 'cpu', ... as DeepSpeed's accelerator reports it (DS_ACCELERATOR picks it)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def resolve_precision(bf16: bool, accelerator_name: str) -> str:
    """'bf16' if asked for; else the original's fp16 on CUDA, and fp32 elsewhere (no fp16 training on CPU)."""
    if bf16:
        return "bf16"
    return "fp16" if accelerator_name == "cuda" else "fp32"


def hybrid_engine_supported(accelerator_name: str) -> bool:
    """DeepSpeed's hybrid engine runs CUDA inference kernels only ("not been implemented on CPU backend")."""
    return accelerator_name == "cuda"


def resolve_hybrid_engine(requested: bool, accelerator_name: str = None, model_path: str = None) -> bool:
    """The `--enable_hybrid_engine` decision to pass to `get_train_ds_config`; warns once when it is dropped.

    Dropped off CUDA (no inference kernels), and on CUDA when `model_path` (the actor's config or
    checkpoint directory) is given and `hybrid_engine_layer_contract` finds its decoder layers
    incompatible with DeepSpeed's injected ones, or finds that DeepSpeed would inject nothing
    (no inference policy for the model type, e.g. Qwen2 or Mistral: the engine would only build
    its inference op); generation then uses the Hugging Face modules (under ZeRO-3 with the
    parameters gathered once per generate call, utils/zero3_generation.py).
    """
    if not requested:
        return False
    accelerator_name = accelerator_name or current_accelerator_name()
    if not hybrid_engine_supported(accelerator_name):
        log_once_on_rank_0(
            f"--enable_hybrid_engine is ignored on the '{accelerator_name}' accelerator: DeepSpeed's hybrid "
            "engine needs CUDA inference kernels. Generation uses the HuggingFace forward instead.",
            logging.WARNING,
        )
        return False
    if model_path is not None:
        from utils.hybrid_engine_check import VERDICT_TAG, hybrid_engine_layer_contract

        compatible, reason = hybrid_engine_layer_contract(model_path)
        if not compatible:
            log_once_on_rank_0(
                f"{VERDICT_TAG} --enable_hybrid_engine is ignored for {model_path}: {reason}. Generation "
                "falls back to the Hugging Face path (the model's own generate, no injected kernels).",
                logging.WARNING,
            )
            return False
    return True


def _precision_blocks(precision: str, bf16: bool, fp16_extra: dict) -> dict:
    """The fp16/bf16 sections: only the enabled one, as the original; fp32 disables both explicitly."""
    if precision is None:
        precision = resolve_precision(bf16, current_accelerator_name())
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, **fp16_extra}}
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}}


def _mixed_precision_lora_fields(world_size, device_count) -> dict:
    """ZeRO++ fields of the original's mixed-precision LoRA (quantised frozen weights, hpZ partitions)."""
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if device_count is None:
        from deepspeed.accelerator import get_accelerator

        # The original asked torch.cuda; the accelerator gives the same answer on CUDA and works elsewhere.
        device_count = get_accelerator().device_count()
    fields = {"zero_quantized_nontrainable_weights": True}
    if world_size != device_count:
        fields["zero_hpz_partition_size"] = device_count
    return fields


def get_train_ds_config(offload,
                        stage=2,
                        enable_hybrid_engine=False,
                        inference_tp_size=1,
                        release_inference_cache=False,
                        pin_parameters=True,
                        tp_gather_partition_size=8,
                        max_out_tokens=512,
                        enable_tensorboard=False,
                        enable_mixed_precision_lora=False,
                        bf16=False,
                        memory_efficient_linear=False,
                        tb_path="",
                        tb_name="",
                        precision=None,
                        world_size=None,
                        device_count=None) -> dict:
    """Config of a trained engine, the original's fields. `enable_hybrid_engine` is the final decision
    (see `resolve_hybrid_engine`); `precision=None` resolves from `bf16` and the current accelerator;
    `world_size`/`device_count` default to the live values and matter only for mixed-precision LoRA."""
    device = "cpu" if offload else "none"
    zero_opt = {
        "stage": stage,
        "offload_param": {"device": device},
        "offload_optimizer": {"device": device},
        "stage3_param_persistence_threshold": 100_000,
        "stage3_max_live_parameters": 100_000_000,
        "stage3_prefetch_bucket_size": 100_000_000,
        "memory_efficient_linear": memory_efficient_linear,
    }
    if enable_mixed_precision_lora:
        zero_opt.update(_mixed_precision_lora_fields(world_size, device_count))
    return {
        "train_batch_size": GLOBAL_BATCH_SIZE,
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "steps_per_print": 10,
        "zero_optimization": zero_opt,
        **_precision_blocks(precision, bf16, {"loss_scale_window": 100}),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {
            "enabled": enable_hybrid_engine,
            "max_out_tokens": max_out_tokens,
            "inference_tp_size": inference_tp_size,
            "release_inference_cache": release_inference_cache,
            "pin_parameters": pin_parameters,
            "tp_gather_partition_size": tp_gather_partition_size,
        },
        "tensorboard": {
            "enabled": enable_tensorboard,
            "output_path": f"{tb_path}/ds_tensorboard_logs/",
            "job_name": f"{tb_name}_tensorboard",
        },
    }


def get_eval_ds_config(offload, stage=0, bf16=False, memory_efficient_linear=False, precision=None) -> dict:
    """Config of a frozen engine (reference / reward model): no optimizer offload, no tensorboard."""
    return {
        "train_batch_size": GLOBAL_BATCH_SIZE,
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 10_000,
            "offload_param": {"device": "cpu" if offload else "none"},
            "memory_efficient_linear": memory_efficient_linear,
        },
        **_precision_blocks(precision, bf16, {}),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


def set_batch_sizes(config: dict, micro_batch_size: int, world_size: int, gradient_accumulation_steps: int) -> dict:
    """Fill the batch fields in place (DeepSpeed infers gradient accumulation from them); returns `config`."""
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["train_batch_size"] = micro_batch_size * world_size * gradient_accumulation_steps
    return config
