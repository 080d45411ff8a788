"""Build, load and save models and tokenizers: the one home for checkpoint I/O.

Tokenizer contract (every family): pad token == eos token, right padding. The original read the hub
name stored in `config.json` and built the tokenizer from the hub (fails offline and for models of
your own); we read the tokenizer files of the model directory itself.
"""
import contextlib
import json
import math
import os
import time

import torch
from transformers import AutoConfig, AutoTokenizer

from utils.errors import UserError
from utils.utils import get_rank, print_rank_0

WEIGHTS_NAME = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------- input checks

def _listing(path, limit=6):
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"it holds {shown}" if names else "it is empty"


def check_model_dir(path, flag="--model_name_or_path", need_weights=True, need_tokenizer=True):
    """UserError unless `path` is a local Hugging Face model directory: config.json, weights and
    (if `need_tokenizer`) tokenizer files. Instead of the hub's "Repo id must be in the form ..."
    that transformers gives for a path that does not exist."""
    if not path:
        raise UserError(f"{flag} is empty: pass a local Hugging Face model directory")
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such directory (a local Hugging Face model directory "
                        f"with config.json, weights and tokenizer; nothing is downloaded)")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: a file, not a model directory")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{flag} {path}: not a Hugging Face model directory, no config.json "
                        f"({_listing(path)})")
    try:
        with open(config) as f:
            json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {config}: unreadable ({err})") from None
    if need_weights and not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES):
        raise UserError(f"{flag} {path}: config.json but no weights ({' / '.join(WEIGHT_FILES)})")
    if need_tokenizer and not _has_tokenizer_files(path):
        raise UserError(f"{flag} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save "
                        f"the tokenizer next to the model")


def tokenizers_match(tok_a, tok_b, probe=" Human: Why is the sky blue? Assistant: Because."):
    """None when the two tokenizers agree (vocabulary, special tokens and their ids, an encoding),
    else a short description of the first difference."""
    if len(tok_a) != len(tok_b):
        return f"{len(tok_a)} vs {len(tok_b)} tokens"
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    for token, token_id in sorted(vocab_a.items(), key=lambda item: item[1]):
        if vocab_b.get(token) != token_id:
            other = "absent" if token not in vocab_b else f"id {vocab_b[token]}"
            return f"token {token!r} is id {token_id} vs {other}"
    for name in ("bos", "eos", "unk", "pad"):
        a = (getattr(tok_a, f"{name}_token", None), getattr(tok_a, f"{name}_token_id", None))
        b = (getattr(tok_b, f"{name}_token", None), getattr(tok_b, f"{name}_token_id", None))
        if a != b:
            return f"{name} token {a[0]!r} (id {a[1]}) vs {b[0]!r} (id {b[1]})"
    ids_a, ids_b = tok_a(probe)["input_ids"], tok_b(probe)["input_ids"]
    if ids_a != ids_b:
        return f"{probe!r} encodes as {ids_a} vs {ids_b}"
    return None


def check_same_tokenizer(paths):
    """UserError unless the tokenizers stored in the directories agree. paths: {flag: directory}
    (e.g. stage 3's actor, reward model and critic). A directory without tokenizer files (the
    original's reward checkpoints) cannot be compared: it is skipped with a note."""
    loaded = []
    seen = set()
    for flag, path in paths.items():
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if not _has_tokenizer_files(path):
            print_rank_0(f"[tokenizer] note: {flag} {path} holds no tokenizer files; it is assumed "
                         f"to use the tokenizer of {next(iter(paths))}")
            continue
        loaded.append((flag, path, load_hf_tokenizer(path)))
    for flag, path, tokenizer in loaded[1:]:
        first_flag, first_path, first = loaded[0]
        difference = tokenizers_match(first, tokenizer)
        if difference is not None:
            raise UserError(f"{first_flag} {first_path} and {flag} {path} use different tokenizers "
                            f"({difference}); every model of a run must share the actor's tokenizer")


# ----------------------------------------------------------------------------- tokenizers

def load_hf_tokenizer(model_name_or_path, fast_tokenizer=True):
    """The tokenizer stored with the model, with pad = eos and right padding."""
    if os.path.isdir(model_name_or_path) and not _has_tokenizer_files(model_name_or_path):
        raise UserError(
            f"{model_name_or_path} holds no tokenizer files (tokenizer.json, tokenizer.model, "
            "vocab.json or tokenizer_config.json); save the tokenizer next to the model")
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, use_fast=fast_tokenizer)
    # pad == eos in every stage: the reward is read at the first pad after the prompt, and the
    # action mask keeps the first eos. No new token, so no embedding row is added.
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _has_tokenizer_files(path):
    return any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES)


def check_tokenizer_contract(tokenizer, config, what="model"):
    """Fail early when the tokenizer and the model disagree (a wrong pad/eos id would misplace the reward)."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        raise UserError(f"pad token id {tokenizer.pad_token_id} != eos token id "
                         f"{tokenizer.eos_token_id}: the pipeline needs pad == eos")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the {what} embedding has "
                         f"only {vocab} rows: tokenizer and {what} do not belong together")
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and eos != tokenizer.eos_token_id:
        raise UserError(f"the {what} config's eos_token_id {eos} differs from the tokenizer's "
                         f"{tokenizer.eos_token_id} ({tokenizer.eos_token!r})")


def disable_dropout_in_config(config):
    """Zero every dropout probability of the config (the original set only `config.dropout`)."""
    for name, value in list(vars(config).items()):
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)


def engine_dtype(ds_config):
    """The dtype of the parameters of a DeepSpeed engine built with `ds_config`: bf16 or fp16 when the
    config enables it, else (and for None, no engine) float32. DeepSpeed casts a bf16/fp16 engine's
    parameters to that dtype at initialize but leaves an fp32 engine's parameters as they come."""
    if not ds_config:
        return torch.float32
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                       ("fp16", torch.float16)):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled") is True:
            return dtype
    return torch.float32


def create_hf_model(model_class, model_name_or_path, tokenizer, ds_config=None, rlhf_training=False,
                    disable_dropout=False):
    """Build `model_class` (AutoModelForCausalLM, AutoModel) from a local HF directory, in the dtype
    of the engine `ds_config` describes (`engine_dtype`).

    With a ZeRO-3 `ds_config` the model is constructed partitioned (zero.Init through
    HfDeepSpeedConfig). `rlhf_training` builds from the config only (weights are loaded later).

    Memory: no rank holds an fp32 copy of a bf16/fp16 model (the original loaded fp32 on every
    rank and left the cast to DeepSpeed: 27 GB per rank for a 7B half checkpoint). transformers
    5.24 keeps a checkpoint tensor already in the asked dtype as a view of the memory-mapped file
    and converts any other one tensor at a time. The weights are the same as the old path's: fp32
    → bf16/fp16 is the same rounding whether transformers or DeepSpeed does it, and a half
    checkpoint becomes fp32 exactly for an fp32 engine (test_model_utils.py, test_load_precision.py).
    Under ZeRO-3, transformers reads the checkpoint on rank 0 only (memory-mapped; the other ranks
    read its header) and fills the partitioned model one module at a time
    (`_load_state_dict_into_zero3_model`).
    """
    config = AutoConfig.from_pretrained(model_name_or_path)
    if disable_dropout:
        disable_dropout_in_config(config)
    dtype = engine_dtype(ds_config)
    # transformers sees ZeRO 3 only while this object lives (a weak reference): construction AND
    # the resize must happen inside it, or the resize meets a partitioned (empty) embedding weight.
    zero3 = _zero3_context(ds_config)
    if rlhf_training:
        # An explicit dtype: from_config would otherwise use config.json's torch_dtype.
        model = model_class.from_config(config, dtype=dtype)
    else:
        model = model_class.from_pretrained(model_name_or_path, config=config, dtype=dtype)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    resize_embeddings(model, tokenizer)
    del zero3  # released after the resize (the original order crashed whenever a resize was due)
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


@contextlib.contextmanager
def lm_head_inputs(head):
    """While open, the LM-head module `head` records each input (the final hidden states, after
    the model's own slicing by `logits_to_keep`) into the yielded list and returns [..., 0] empty
    logits instead of computing any. Its hooks (ZeRO-3's gather and release) still run; calling
    `head` after the block computes logits as usual, so callers can run it chunk by chunk."""
    captured = []

    def record(hidden):
        captured.append(hidden)
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    own = head.__dict__.get("forward")   # a forward already set on the instance (by a wrapper)
    head.forward = record                 # an instance attribute shadows the class's forward
    try:
        yield captured
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _cpu_copy(tensor):
    return tensor.to("cpu", copy=True)


def _zero3_partitioned(module):
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gather_state_dict(model, rank=None):
    """The full state dict as CPU tensors on rank 0 (None elsewhere), LoRA merged into a copy.

    Under ZeRO-3 a collective (every rank calls it) in which only rank 0 copies the gathered
    tensors; otherwise the other ranks return at once. (Every rank used to build a full CPU copy:
    7B on 8 GPUs, ~100 GB of host memory per save for nothing.)
    """
    from utils.module.lora import lora_merged_state_dict

    rank = get_rank() if rank is None else rank
    module = unwrap(model)
    if rank != 0 and not _zero3_partitioned(module):
        return None
    state = lora_merged_state_dict(module, keep=rank == 0, copy=_cpu_copy)
    return state if rank == 0 else None


def write_safetensors_atomic(state_dict, path, metadata=None):
    """Write to a temp file in the same directory, then rename: a crash never leaves half a file."""
    from safetensors.torch import save_file

    from utils.atomic import replaced_atomically

    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    with replaced_atomically(path) as tmp:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})


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


def full_numel(params):
    """Elements of `params`, ZeRO-3 aware: a partitioned parameter's numel is 0 and its full size
    is in ds_numel, so this is the whole model's count on every rank, not one rank's share."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)


def count_parameters(model):
    """Parameter count of a model or engine (`full_numel` of its parameters)."""
    return full_numel(unwrap(model).parameters())



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

    from utils.model.reward_model import (RewardModel, check_reward_model_dir,
                                          check_reward_state_dict_keys, open_reward_checkpoint)

    start = time.time()
    if not rlhf_training:
        backbone = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config,
                                   disable_dropout=disable_dropout)
        check_tokenizer_contract(tokenizer, backbone.config, "reward model")
        return RewardModel(backbone, tokenizer.pad_token_id, num_padding_at_beginning)
    check_reward_model_dir(model_name_or_path, "reward model")
    # Keys and shapes now, each tensor when it is copied (on rank 0 only under ZeRO-3): no rank
    # holds the whole checkpoint (they all used to read it whole, beside an fp32 model).
    with open_reward_checkpoint(model_name_or_path) as (state, meta):
        if meta is not None and meta.get("num_padding_at_beginning") != num_padding_at_beginning:
            print_rank_0(f"[reward] note: the checkpoint was trained with num_padding_at_beginning="
                         f"{meta.get('num_padding_at_beginning')}, the flag says "
                         f"{num_padding_at_beginning} (it only affects the pairwise loss)")
        backbone = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config,
                                   rlhf_training=True, disable_dropout=disable_dropout)
        check_tokenizer_contract(tokenizer, backbone.config, "reward model")
        model = RewardModel(backbone, tokenizer.pad_token_id, num_padding_at_beginning)
        check_reward_state_dict_keys(model, state, source=model_name_or_path)
        load_state_dict_into_model(model, state)
    print_rank_0(f"[reward] loaded {model_name_or_path} ({len(state)} tensors) in "
                 f"{time.time() - start:.1f}s")
    return model


@torch.no_grad()
def load_state_dict_into_model(model, state_dict):
    """Copy `state_dict` into `model`, ZeRO-3 aware: each module's own partitioned parameters are
    gathered, filled on rank 0 and re-partitioned. Keys must have been checked by the caller.

    `state_dict`: a dict, or a mapping that reads a tensor when it is indexed (the reward
    checkpoint's `LazyStateDict`): each parameter's tensor is read only by the rank that fills it
    and dropped after its copy. Buffers (none in OPT or Llama checkpoints) are read on every rank."""
    from utils.module.lora import gathered_parameters

    rank = get_rank()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if prefix + n in state_dict]
        with gathered_parameters([p for _, p in own], modifier_rank=0):
            if rank == 0 or not any(hasattr(p, "ds_id") for _, p in own):
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
