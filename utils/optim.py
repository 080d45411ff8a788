"""Optimizer parameter groups, the optimizer and the LR schedule."""
import torch

from utils.ds_utils import current_accelerator_name, log_once_on_rank_0

# Deliberate fix: the original's "LayerNorm.weight" matched no OPT/Llama norm name, so norms were decayed.
DEFAULT_NO_DECAY_NAMES = ("bias", "norm")
DEFAULT_LORA_NAMES = ("lora_right_weight", "lora_left_weight")


def _contains_any(name: str, substrings) -> bool:
    name = name.lower()
    return any(s.lower() in name for s in substrings)


def get_optimizer_grouped_parameters(model, weight_decay, lora_lr=5e-4, no_decay_name_list=None, lora_name_list=None):
    """Three groups over trainable parameters, empty ones dropped:
    decayed (lr from the optimizer), decayed LoRA factors (`lr = lora_lr`), and not decayed.
    Names are matched by case-insensitive substring; the default no-decay rule exempts every bias and
    every normalisation weight (`layer_norm`, `layernorm`, `norm`, `LayerNorm`)."""
    no_decay_names = DEFAULT_NO_DECAY_NAMES if no_decay_name_list is None else no_decay_name_list
    lora_names = DEFAULT_LORA_NAMES if lora_name_list is None else lora_name_list
    decay, lora_decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _contains_any(name, no_decay_names):
            no_decay.append(param)
        elif _contains_any(name, lora_names):
            lora_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": lora_decay, "weight_decay": weight_decay, "lr": lora_lr},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def optimizer_kind(offload: bool, accelerator_name: str) -> str:
    """Which Adam the original's choice maps to here: the compiled CPU Adam for ZeRO-Offload, the fused
    CUDA kernel on CUDA, else torch's AdamW (ZeRO accepts a client torch optimizer)."""
    if offload:
        return "DeepSpeedCPUAdam"
    if accelerator_name == "cuda":
        return "FusedAdam"
    return "AdamW"


def create_optimizer(param_groups, lr, offload, betas=(0.9, 0.95), eps=1e-8):
    """Decoupled-weight-decay Adam over `param_groups` (groups carry their own weight_decay / lr)."""
    kind = optimizer_kind(offload, current_accelerator_name())
    if kind == "DeepSpeedCPUAdam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, adamw_mode=True)
    elif kind == "FusedAdam":
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, adam_w_mode=True)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    log_once_on_rank_0(f"optimizer: {kind} (lr {lr}, betas {tuple(betas)}, eps {eps})")
    return optimizer


def create_lr_scheduler(optimizer, name, num_warmup_steps, num_training_steps):
    """`transformers.get_scheduler`; DeepSpeed steps it once per applied optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(name=name, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps)
