"""LoRA for nn.Linear layers, and a merged export that leaves the training model untouched.

W: [out, in] (the wrapped Linear's weight), right R: [in, r], left L: [r, out], scaling s = lora_scaling / r.
    y = x W^T + b + s * dropout(x) R L            merged weight: W + s * L^T R^T
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LORA_PARAM_NAMES = ("lora_right_weight", "lora_left_weight")


class LinearLayer_LoRA(nn.Module):
    """A Linear with a frozen base weight and a trainable low-rank update (the base bias stays trainable)."""

    def __init__(self, weight: nn.Parameter, lora_dim=0, lora_scaling=1, lora_dropout=0, bias=None):
        super().__init__()
        if lora_dim <= 0:
            raise ValueError(f"LoRA needs lora_dim > 0 (got {lora_dim}); leave LoRA off instead of passing 0.")
        self.weight = weight
        self.weight.requires_grad = False
        self.bias = bias
        # Under ZeRO-3 the weight is a partition placeholder; `ds_shape` holds its full [out, in] shape.
        out_features, in_features = getattr(weight, "ds_shape", weight.shape)
        # Drawn in float32, then stored in the weight's dtype: the same numbers whether the model was
        # loaded in fp32 and cast by DeepSpeed or loaded in its half training dtype directly.
        right = torch.empty(in_features, lora_dim, device=weight.device, dtype=torch.float32)
        # As the original: on an [in, r] tensor kaiming takes fan_in = r, so the bound is 1/sqrt(r) (not 1/sqrt(in)).
        nn.init.kaiming_uniform_(right, a=math.sqrt(5))
        self.lora_right_weight = nn.Parameter(right.to(weight.dtype))
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, out_features, device=weight.device,
                                                         dtype=weight.dtype))
        self.lora_scaling = lora_scaling / lora_dim
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.fused = False

    def lora_delta(self) -> torch.Tensor:
        """s * L^T R^T: [out, in], the update the LoRA factors add to the weight."""
        return self.lora_scaling * (self.lora_left_weight.t() @ self.lora_right_weight.t())

    def fuse_lora(self):
        """Add the update into the weight in place (caller gathers ZeRO-3 params first)."""
        if not self.fused:
            with torch.no_grad():
                self.weight += self.lora_delta().to(self.weight.dtype)
            self.fused = True

    def unfuse_lora(self):
        """Undo `fuse_lora` (caller gathers ZeRO-3 params first)."""
        if self.fused:
            with torch.no_grad():
                self.weight -= self.lora_delta().to(self.weight.dtype)
            self.fused = False

    def forward(self, input):
        output = F.linear(input, self.weight, self.bias)
        if self.fused:
            return output
        return output + (self.lora_dropout(input) @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling

    def extra_repr(self):
        rank = self.lora_left_weight.shape[0]
        return f"lora_dim={rank}, lora_scaling={self.lora_scaling}, fused={self.fused}"


def find_lora_target_modules(model: nn.Module, part_module_name: str) -> list:
    """Qualified names of the nn.Linear modules whose name contains `part_module_name`."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and part_module_name in name]


def convert_linear_layer_to_lora(model, part_module_name, lora_dim=0, lora_scaling=1, lora_dropout=0,
                                 flag_name="--lora_module_name"):
    """Replace every matching nn.Linear by a LinearLayer_LoRA on the same weight/bias; returns `model`.
    `flag_name` is the CLI flag named in the error when nothing matches."""
    if lora_dim <= 0:
        raise ValueError(f"LoRA needs lora_dim > 0 (got {lora_dim}); leave LoRA off instead of passing 0.")
    targets = find_lora_target_modules(model, part_module_name)
    if not targets:
        # The original silently trained without LoRA here (its default "decoder.layers." matches nothing in Llama).
        raise ValueError(
            f"{flag_name} {part_module_name!r} matches no nn.Linear module of {type(model).__name__}, so LoRA "
            "would do nothing. Use a substring of the layer names, e.g. 'decoder.layers.' for OPT or "
            "'layers.' for Llama.")
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        setattr(parent, child_name, LinearLayer_LoRA(linear.weight, lora_dim, lora_scaling, lora_dropout, linear.bias))
    return model


def only_optimize_lora_parameters(model):
    """Freeze everything except the LoRA factors; returns `model`."""
    for name, param in model.named_parameters():
        param.requires_grad = any(lora_name in name for lora_name in LORA_PARAM_NAMES)
    return model


def make_model_gradient_checkpointing_compatible(model):
    """With a frozen embedding, checkpointed blocks would see inputs without grad and drop the LoRA
    gradients; make the embedding output require grad. No-op for models with neither hook (e.g. the
    reward-model wrapper). Returns `model`."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        def make_output_require_grad(module, inputs, output):
            output.requires_grad_(True)

        model.get_input_embeddings().register_forward_hook(make_output_require_grad)
    return model


def merge_lora_weight(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * L^T R^T as a new tensor in W's dtype (computed in fp32).
    weight: [out, in], left: [r, out], right: [in, r]."""
    delta = scaling * (left.float().t() @ right.float().t())
    return (weight.float() + delta).to(weight.dtype)


@contextmanager
def gathered_parameters(params, modifier_rank=None):
    """Full ZeRO-3 parameters inside the block (a collective: every rank must enter); no-op otherwise."""
    zero_params = [p for p in params if hasattr(p, "ds_id")]
    if not zero_params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


def lora_merged_state_dict(model: nn.Module, keep=True, copy=None):
    """The model's state dict as CPU copies, with every LoRA update merged into its base weight and no
    "lora" keys: a plain HF checkpoint. The model is not modified (the original fused in place at every
    save, after which LoRA stopped training). Under ZeRO-3 it gathers one module at a time, so every
    rank must call it, in the same module order; with `keep=False` a rank only takes part in the
    gathers, copies nothing and returns None. `copy(tensor)`: how a tensor is copied to the CPU."""
    copy = copy or (lambda tensor: tensor.to("cpu", copy=True))
    keys_by_module = {}
    for key in model.state_dict().keys():  # keys only: under ZeRO-3 the values are empty partitions
        module_name, _, attr = key.rpartition(".")
        keys_by_module.setdefault(module_name, []).append(attr)

    merged = {} if keep else None
    for module_name, attrs in keys_by_module.items():
        module = model.get_submodule(module_name)
        prefix = f"{module_name}." if module_name else ""
        with gathered_parameters(module.parameters(recurse=False)):
            if not keep:
                continue
            for attr in attrs:
                if attr in LORA_PARAM_NAMES:
                    continue
                tensor = getattr(module, attr).detach()
                if attr == "weight" and isinstance(module, LinearLayer_LoRA) and not module.fused:
                    tensor = merge_lora_weight(tensor, module.lora_left_weight.detach(),
                                               module.lora_right_weight.detach(), module.lora_scaling)
                merged[prefix + attr] = copy(tensor)
    return merged


def apply_lora(model, lora_dim, part_module_name, only_optimize_lora=False,
               flag_name="--lora_module_name"):
    """The stages' LoRA set-up; a no-op when lora_dim is 0. With only_optimize_lora the base
    weights are frozen, and the embedding output is made to require grad so that gradient
    checkpointing still reaches the LoRA factors. Returns `model`."""
    if lora_dim <= 0:
        return model
    convert_linear_layer_to_lora(model, part_module_name, lora_dim, flag_name=flag_name)
    if only_optimize_lora:
        only_optimize_lora_parameters(model)
        make_model_gradient_checkpointing_compatible(model)
    return model
