"""Build, load and save models and tokenizers: the one home for checkpoint I/O.

Tokenizer contract (every family): pad token == eos token, right padding. The original read the hub
name stored in `config.json` and built the tokenizer from the hub (fails offline and for models of
your own); we read the tokenizer files of the model directory itself.
"""
import math
import os
import time

import torch
from transformers import AutoConfig, AutoTokenizer

from utils.utils import get_rank, print_rank_0

WEIGHTS_NAME = "model.safetensors"


def load_hf_tokenizer(model_name_or_path, fast_tokenizer=True):
    """The tokenizer stored with the model, with pad = eos and right padding."""
    if os.path.isdir(model_name_or_path) and not _has_tokenizer_files(model_name_or_path):
        raise FileNotFoundError(
            f"{model_name_or_path} holds no tokenizer files (tokenizer.json, tokenizer.model, "
            "vocab.json or tokenizer_config.json); save the tokenizer next to the model")
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, use_fast=fast_tokenizer)
    # pad == eos in every stage: the reward is read at the first pad after the prompt, and the
    # action mask keeps the first eos. No new token, so no embedding row is added.
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _has_tokenizer_files(path):
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def check_tokenizer_contract(tokenizer, config, what="model"):
    """Fail early when the tokenizer and the model disagree (a wrong pad/eos id would misplace the reward)."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        raise ValueError(f"pad token id {tokenizer.pad_token_id} != eos token id "
                         f"{tokenizer.eos_token_id}: the pipeline needs pad == eos")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {what} embedding has "
                         f"only {vocab} rows: tokenizer and {what} do not belong together")
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and eos != tokenizer.eos_token_id:
        raise ValueError(f"the {what} config's eos_token_id {eos} differs from the tokenizer's "
                         f"{tokenizer.eos_token_id} ({tokenizer.eos_token!r})")


def disable_dropout_in_config(config):
    """Zero every dropout probability of the config (the original set only `config.dropout`)."""
    for name, value in list(vars(config).items()):
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)


def create_hf_model(model_class, model_name_or_path, tokenizer, ds_config=None, rlhf_training=False,
                    disable_dropout=False):
    """Build `model_class` (AutoModelForCausalLM, AutoModel) from a local HF directory.

    With a ZeRO-3 `ds_config` the model is constructed partitioned (zero.Init through
    HfDeepSpeedConfig). `rlhf_training` builds from the config only (weights are loaded later).
    """
    config = AutoConfig.from_pretrained(model_name_or_path)
    if disable_dropout:
        disable_dropout_in_config(config)
    zero3 = _zero3_context(ds_config)  # must stay referenced while the model is constructed
    if rlhf_training:
        model = model_class.from_config(config)
    else:
        # transformers 5 loads in the checkpoint's dtype by default; DeepSpeed casts to the
        # training precision itself, so start from fp32 master weights as the original did.
        model = model_class.from_pretrained(model_name_or_path, config=config, dtype=torch.float32)
    del zero3
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    resize_embeddings(model, tokenizer)
    return model


def _zero3_context(ds_config):
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(ds_config)
    return None


def resize_embeddings(model, tokenizer):
    """Grow the embedding to a multiple of 8 rows covering the tokenizer (the original also shrank
    it when the model had more rows than that; we never drop rows a checkpoint was trained with)."""
    wanted = int(8 * math.ceil(len(tokenizer) / 8.0))
    if wanted > model.config.vocab_size:
        model.resize_token_embeddings(wanted)


def unwrap(model):
    """The plain module behind a DeepSpeed engine."""
    return model.module if hasattr(model, "module") else model


def gather_state_dict(model, rank=None):
    """The full state dict as CPU tensors on rank 0 (None elsewhere), LoRA merged into a copy.

    A collective under ZeRO-3 (parameters are gathered one module at a time): every rank calls it.
    """
    from utils.module.lora import lora_merged_state_dict

    state = lora_merged_state_dict(unwrap(model))
    return state if (get_rank() if rank is None else rank) == 0 else None


def write_safetensors_atomic(state_dict, path, metadata=None):
    """Write to a temp file in the same directory, then rename: a crash never leaves half a file."""
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def verify_safetensors(path, state_dict):
    """Re-open a written file and check every tensor is there with its shape (no silently partial save)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing = set(state_dict) - keys
        if missing:
            raise RuntimeError(f"{path} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name in state_dict:
            if tuple(f.get_slice(name).get_shape()) != tuple(state_dict[name].shape):
                raise RuntimeError(f"{path}: tensor {name} was written with a wrong shape")


def save_hf_format(model, tokenizer, output_dir, sub_folder="", rank=None):
    """Save a causal LM (engine or module) into `<output_dir>/<sub_folder>` as a plain HF checkpoint.

    Every rank calls this (ZeRO-3 gather); rank 0 writes config.json, generation_config.json,
    model.safetensors (LoRA merged into a copy; the training model is not touched) and the tokenizer.
    """
    state = gather_state_dict(model, rank)
    if state is None:
        return None
    save_dir = os.path.join(output_dir, sub_folder) if sub_folder else output_dir
    module = unwrap(model)
    write_pretrained_dir(save_dir, module.config, state, tokenizer,
                         getattr(module, "generation_config", None))
    return save_dir


def write_pretrained_dir(save_dir, config, state, tokenizer, generation_config=None):
    os.makedirs(save_dir, exist_ok=True)
    weights = os.path.join(save_dir, WEIGHTS_NAME)
    write_safetensors_atomic(state, weights)
    verify_safetensors(weights, state)
    config.save_pretrained(save_dir)
    if generation_config is not None:
        generation_config.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    # An older pytorch_model.bin beside the new weights would shadow nothing but confuse readers.
    stale = os.path.join(save_dir, "pytorch_model.bin")
    if os.path.exists(stale):
        os.remove(stale)


def count_parameters(model):
    """Parameter count, ZeRO-3 aware (partitioned params report their full size in ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in unwrap(model).parameters())



# ----------------------------------------------------------------------------- reward models

def create_critic_model(model_name_or_path, tokenizer, ds_config=None, num_padding_at_beginning=0,
                        rlhf_training=False, disable_dropout=False):
    """A RewardModel (headless decoder + value head).

    `rlhf_training=False` (stage 2): the backbone comes from a causal-LM or base checkpoint and the
    head is fresh. `rlhf_training=True` (stage 3, rw_eval): both come from a stage-2 checkpoint
    directory, ours or the original's `pytorch_model.bin`; every key is checked (the original
    silently ignored missing ones, so an untrained head could score a whole RLHF run).
    """
    from transformers import AutoModel

    from utils.model.reward_model import (RewardModel, check_reward_state_dict_keys,
                                          read_reward_checkpoint)

    start = time.time()
    if not rlhf_training:
        backbone = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config,
                                   disable_dropout=disable_dropout)
        check_tokenizer_contract(tokenizer, backbone.config, "reward model")
        return RewardModel(backbone, tokenizer.pad_token_id, num_padding_at_beginning)
    if not os.path.isdir(model_name_or_path):
        raise FileNotFoundError(f"reward model directory {model_name_or_path} does not exist")
    state, meta = read_reward_checkpoint(model_name_or_path)
    if meta is not None and meta.get("num_padding_at_beginning") != num_padding_at_beginning:
        print_rank_0(f"[reward] note: the checkpoint was trained with num_padding_at_beginning="
                     f"{meta.get('num_padding_at_beginning')}, the flag says "
                     f"{num_padding_at_beginning} (it only affects the pairwise loss)")
    backbone = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config,
                               rlhf_training=True, disable_dropout=disable_dropout)
    check_tokenizer_contract(tokenizer, backbone.config, "reward model")
    model = RewardModel(backbone, tokenizer.pad_token_id, num_padding_at_beginning)
    check_reward_state_dict_keys(model, state)
    load_state_dict_into_model(model, state)
    print_rank_0(f"[reward] loaded {model_name_or_path} ({len(state)} tensors) in "
                 f"{time.time() - start:.1f}s")
    return model


@torch.no_grad()
def load_state_dict_into_model(model, state_dict):
    """Copy `state_dict` into `model`, ZeRO-3 aware: each module's own partitioned parameters are
    gathered, filled on rank 0 and re-partitioned. Keys must have been checked by the caller."""
    from utils.module.lora import gathered_parameters

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if prefix + n in state_dict]
        with gathered_parameters([p for _, p in own], modifier_rank=0):
            if get_rank() == 0 or not any(hasattr(p, "ds_id") for _, p in own):
                for name, param in own:
                    param.data.copy_(state_dict[prefix + name].to(param.dtype))
        for name, buf in module.named_buffers(recurse=False):
            if prefix + name in state_dict:
                buf.copy_(state_dict[prefix + name].to(buf.dtype))


def save_reward_model(model, tokenizer, output_dir, num_padding_at_beginning, rank=None):
    """Save a reward model (engine or module) in our self-describing layout (see reward_model.py).
    Every rank calls this under ZeRO-3; rank 0 writes."""
    from utils.model.reward_model import save_reward_checkpoint

    state = gather_state_dict(model, rank)
    if state is None:
        return None
    module = unwrap(model)
    os.makedirs(output_dir, exist_ok=True)
    save_reward_checkpoint(output_dir, state, module.rwtranrsformer.config, tokenizer.pad_token_id,
                           num_padding_at_beginning, tokenizer)
    stale = os.path.join(output_dir, "pytorch_model.bin")
    if os.path.exists(stale):  # an original-layout file would be read instead of ours otherwise
        os.remove(stale)
    return output_dir
