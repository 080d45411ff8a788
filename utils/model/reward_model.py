"""Reward model: a headless decoder with a scalar value head, and its checkpoint files.

Scores are read at one token per sequence:
* pairwise training (step 2) at the end token of each sequence, ``pairwise_end_index``;
* scoring generated answers (step 3) at the first eos of the answer, ``answer_end_index``.
pad == eos in every supported family, so "first pad id" means "first eos".

Checkpoint layouts
------------------
Ours, a self-describing directory (written by ``save_reward_checkpoint``)::

    <dir>/config.json              backbone config  } AutoModel.from_pretrained(<dir>) loads the
    <dir>/model.safetensors        backbone weights } headless backbone; keys carry no prefix
    <dir>/value_head.safetensors   {"v_head.weight": [1, d]}
    <dir>/reward_model.json        {"format_version": 1, "num_padding_at_beginning": k, "pad_token_id": id}
    <dir>/tokenizer files          (tokenizer.save_pretrained, when a tokenizer is given)

The original's (step 2 of liziniu/ReMax), read by ``read_original_reward_checkpoint``::

    <dir>/pytorch_model.bin        pickled state dict: "rwtranrsformer.<backbone key>" + "v_head.weight"

In memory the wrapper keeps the original's state-dict keys (the attribute is literally ``rwtranrsformer``),
so ``join_reward_state_dict`` turns our files into exactly what the original saved.
Nothing here knows about DeepSpeed: under ZeRO-3 the caller gathers the parameters before saving and
loads with its own gathering; atomic writes (temp dir + rename) are the caller's too.
"""
import contextlib
import json
import os
import re
import zipfile
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from utils.errors import UserError
from utils.model.lm_head import float32_linear

BACKBONE_PREFIX = "rwtranrsformer."  # the original's typo; checkpoint keys depend on it
VALUE_HEAD_KEY = "v_head.weight"
BACKBONE_WEIGHTS_FILE = "model.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_CONFIG_FILE = "reward_model.json"
ORIGINAL_CHECKPOINT_FILE = "pytorch_model.bin"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- end-score indices

def pairwise_end_index(input_ids, pad_token_id, num_padding_at_beginning=0):
    """Index of the token whose value is a sequence's score in pairwise training.

    input_ids: [N, L] right-padded "prompt + answer + eos" rows. Returns a LongTensor [N]: the position of
    the pad id number ``num_padding_at_beginning`` (0-based) of each row, else L-1 (truncated row).
    OPT's leading BOS is ``</s>`` = the pad id, hence 1 for OPT and 0 for Llama.
    """
    seq_len = input_ids.shape[1]
    is_pad = input_ids == pad_token_id
    pads_so_far = is_pad.cumsum(dim=1)
    wanted = is_pad & (pads_so_far == num_padding_at_beginning + 1)
    positions = torch.arange(seq_len, device=input_ids.device)
    return torch.where(wanted, positions, seq_len - 1).amin(dim=1)


def answer_end_index(input_ids, pad_token_id, prompt_length):
    """Index of the first eos of each answer (step-3 scoring).

    input_ids: [B, L] = left-padded prompt of width ``prompt_length`` followed by the answer.
    Returns a LongTensor [B]: the first position >= prompt_length holding the pad id (= eos), else L-1.
    Pad ids inside the prompt (left padding, an eos in the prompt text) are never picked.
    """
    seq_len = input_ids.shape[1]
    positions = torch.arange(seq_len, device=input_ids.device)
    wanted = (input_ids == pad_token_id) & (positions >= prompt_length)
    return torch.where(wanted, positions, seq_len - 1).amin(dim=1)


# ----------------------------------------------------------------------------- the model

class Float32Head(nn.Linear):
    """A Linear computed in float32 whatever the dtype of its input and weight: the value head.

    In a bf16 engine a bf16 head rounds every score to bf16 (steps of 0.016-0.031 at |r| 2-8, when
    ReMax's r - r_greedy is often about 0.1). DeepSpeed casts the whole module to bf16/fp16 at
    initialize, so an fp32 weight would not survive; the weight and the hidden states are upcast
    here instead, at use. It stays a module called as one, so ZeRO-3's hooks gather its weight."""

    def forward(self, hidden):
        return float32_linear(self, hidden)


class RewardModel(nn.Module):
    """``v_head(backbone(input_ids).last_hidden_state)``: one float32 scalar per token, [N, L]
    (the head runs in float32 from the backbone's hidden states, ``Float32Head``).

    base_model: a headless HF decoder (``AutoModel``: OPTModel, LlamaModel, ...).
    pad_token_id: the tokenizer's pad id (== eos id; the caller checks the tokenizer contract).
    """

    def __init__(self, base_model, pad_token_id, num_padding_at_beginning=0):
        super().__init__()
        self.config = base_model.config
        self.pad_token_id = pad_token_id
        self.num_padding_at_beginning = num_padding_at_beginning
        # OPT projects its last hidden state to word_embed_proj_dim (e.g. 512 vs 1024 for OPT-350m).
        # Unlike the original we do not write config.n_embd onto the shared config.
        head_dim = getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size
        # Initialised in float32 and then stored in the backbone's dtype: the numbers of the fp32
        # head the original's engines cast (a bf16 draw differs), in the dtype ZeRO-3 partitions.
        self.v_head = Float32Head(head_dim, 1, bias=False, dtype=torch.float32)
        dtype = getattr(base_model, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float32:
            self.v_head.to(dtype)
        self.rwtranrsformer = base_model

    @property
    def backbone(self):
        return self.rwtranrsformer

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        # transformers 5 names it activation checkpointing; the old name only warns.
        self.rwtranrsformer.activation_checkpointing_enable(
            activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.rwtranrsformer.activation_checkpointing_disable()

    def enable_input_require_grads(self):
        # The original lacked it, so LoRA-only + gradient checkpointing could leave LoRA without gradients.
        self.rwtranrsformer.enable_input_require_grads()

    def _token_values(self, input_ids, attention_mask, use_cache, **backbone_kwargs):
        """[N, L] -> [N, L] float32. head_mask / position_ids are not passed (OPT derives positions
        from the mask)."""
        outputs = self.rwtranrsformer(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=use_cache, **backbone_kwargs)
        return self.v_head(outputs.last_hidden_state).squeeze(-1)

    def forward(self, input_ids, attention_mask=None, use_cache=False, **backbone_kwargs):
        """Pairwise loss. input_ids: [2B, L], rows 0..B-1 chosen, B..2B-1 rejected.

        Returns {"loss": mean_i -log σ(s_c,i - s_r,i), "chosen_mean_scores": [B], "rejected_mean_scores": [B]}
        (the original's names: these are end-token scores, not means).
        """
        if input_ids.shape[0] % 2:
            raise ValueError(f"pairwise batch needs an even number of rows (chosen then rejected), "
                             f"got {input_ids.shape[0]}")
        values = self._token_values(input_ids, attention_mask, use_cache, **backbone_kwargs)
        # Identical chosen/rejected rows get the same index on both sides, as the original's r_ind = c_ind.
        # The original's divergence-index assert and truncated-reward slices fed nothing; left out.
        end = pairwise_end_index(input_ids, self.pad_token_id, self.num_padding_at_beginning)
        end_scores = values.gather(1, end.unsqueeze(1)).squeeze(1)
        pairs = input_ids.shape[0] // 2
        chosen_scores, rejected_scores = end_scores[:pairs], end_scores[pairs:]
        # float32 difference: in fp16/bf16 (the original) close scores lose their digits or overflow.
        loss = -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()
        return {"loss": loss, "chosen_mean_scores": chosen_scores, "rejected_mean_scores": rejected_scores}

    def forward_value(self, input_ids, attention_mask=None, return_value_only=False, prompt_length=0,
                      use_cache=False, **backbone_kwargs):
        """Per-token values [B, L]; unless ``return_value_only``, also the score at the answer's first eos.

        input_ids: [B, L] = left-padded prompt of width ``prompt_length`` + answer.
        Returns values, or {"values": [B, L], "chosen_end_scores": [B]}.
        """
        values = self._token_values(input_ids, attention_mask, use_cache, **backbone_kwargs)
        if return_value_only:
            return values
        if prompt_length <= 1:
            raise ValueError(f"prompt_length must be greater than 1 to select the end score, got {prompt_length}")
        end = answer_end_index(input_ids, self.pad_token_id, prompt_length)
        return {"values": values, "chosen_end_scores": values.gather(1, end.unsqueeze(1)).squeeze(1)}


# ----------------------------------------------------------------------------- state dicts and files

def split_reward_state_dict(state_dict):
    """{"rwtranrsformer.<k>": t, "v_head.weight": t} -> ({"<k>": t}, {"v_head.weight": t})."""
    backbone, head, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        if key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX):]] = tensor
        elif key.startswith("v_head."):
            head[key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"reward state dict has keys outside '{BACKBONE_PREFIX}*' and 'v_head.*': {sorted(unknown)}")
    return backbone, head


def join_reward_state_dict(backbone_state_dict, head_state_dict):
    """Inverse of ``split_reward_state_dict``."""
    joined = {BACKBONE_PREFIX + key: tensor for key, tensor in backbone_state_dict.items()}
    joined.update(head_state_dict)
    return joined


def _original_checkpoint_path(path):
    if os.path.isdir(path):
        path = os.path.join(path, ORIGINAL_CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no reward-model checkpoint at {path}")
    return path


def read_original_reward_checkpoint(path):
    """State dict of the original's step-2 output: ``path`` is its directory or its pytorch_model.bin."""
    path = _original_checkpoint_path(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    return state_dict


def _original_checkpoint_keys(path):
    """Keys of a pytorch_model.bin, read through a memory map (no tensor is loaded); None when the
    file cannot be mapped (the legacy non-zip format)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unmappable or unreadable file: decided when it is loaded
        return None
    return list(state_dict) if isinstance(state_dict, dict) else None


def _architecture(directory):
    try:
        with open(os.path.join(directory, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return None
    return architectures[0] if architectures else None


def check_reward_model_dir(directory, flag="--reward_model_name_or_path"):
    """UserError unless ``directory`` holds a reward model in one of the two layouts (module doc);
    the message says what the directory is instead (e.g. a stage-1 causal-LM checkpoint) and what
    it lacks. Reads file names, config.json and, for the original layout, the keys only."""
    if not directory:
        raise UserError(f"{flag} is empty: pass a stage-2 output directory")
    if not os.path.exists(directory):
        raise UserError(f"{flag} {directory}: no such directory (a stage-2 output directory; "
                        f"nothing is downloaded)")
    if not os.path.isdir(directory):
        raise UserError(f"{flag} {directory}: a file, not a reward-model directory")
    has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
    ours = ("config.json", BACKBONE_WEIGHTS_FILE, VALUE_HEAD_FILE, REWARD_CONFIG_FILE)
    if has(REWARD_CONFIG_FILE) or has(VALUE_HEAD_FILE):
        missing = [name for name in ours if not has(name)]
        if missing:
            raise UserError(f"{flag} {directory}: an incomplete reward-model directory, "
                            f"{', '.join(missing)} missing")
        return
    lacks = f"it has no {VALUE_HEAD_FILE} / {REWARD_CONFIG_FILE} (the value head stage 2 writes)"
    if has(ORIGINAL_CHECKPOINT_FILE):
        keys = _original_checkpoint_keys(os.path.join(directory, ORIGINAL_CHECKPOINT_FILE))
        if keys is None or (VALUE_HEAD_KEY in keys and any(k.startswith(BACKBONE_PREFIX) for k in keys)):
            return  # the original's layout (or a file only loading can judge)
        raise UserError(f"{flag} {directory}: its {ORIGINAL_CHECKPOINT_FILE} is not a reward model "
                        f"(no '{VALUE_HEAD_KEY}' / '{BACKBONE_PREFIX}*' keys; a causal-LM or base "
                        f"checkpoint?); pass a stage-2 output directory")
    weights = [name for name in ("model.safetensors", "model.safetensors.index.json") if has(name)]
    if has("config.json") and weights:
        arch = _architecture(directory) or "unknown architecture"
        kind = "a causal-LM checkpoint" if "CausalLM" in arch else "a model checkpoint"
        raise UserError(f"{flag} {directory}: {kind} ({arch}: config.json + {weights[0]}), not a "
                        f"reward model: {lacks}; pass a stage-2 output directory")
    raise UserError(f"{flag} {directory}: not a reward-model directory: {lacks}, and no "
                    f"{ORIGINAL_CHECKPOINT_FILE} (the original's layout)")


def save_reward_checkpoint(directory, state_dict, config, pad_token_id, num_padding_at_beginning,
                           tokenizer=None):
    """Write the reward model's full (already gathered, LoRA-free) state dict in our layout (module doc)."""
    backbone, head = split_reward_state_dict(state_dict)
    if VALUE_HEAD_KEY not in head:
        raise ValueError(f"refusing to save a reward model without '{VALUE_HEAD_KEY}'")
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: t.contiguous() for k, t in backbone.items()},
              os.path.join(directory, BACKBONE_WEIGHTS_FILE), metadata={"format": "pt"})
    save_file({k: t.contiguous() for k, t in head.items()},
              os.path.join(directory, VALUE_HEAD_FILE), metadata={"format": "pt"})
    meta = {"format_version": FORMAT_VERSION, "num_padding_at_beginning": num_padding_at_beginning,
            "pad_token_id": pad_token_id}
    with open(os.path.join(directory, REWARD_CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_reward_checkpoint(directory):
    """(state dict with the original's keys, reward_model.json dict or None for the original layout),
    every tensor read into memory (``open_reward_checkpoint`` reads them one at a time)."""
    with open_reward_checkpoint(directory) as (lazy, meta):
        return {key: lazy[key] for key in lazy}, meta


def _reward_meta(directory):
    """reward_model.json as a dict; None for the original layout (no such file)."""
    meta_path = os.path.join(directory, REWARD_CONFIG_FILE)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


@contextlib.contextmanager
def open_reward_checkpoint(directory):
    """Yields (LazyStateDict with the original's keys, reward_model.json dict or None for the
    original layout); the files stay open inside the block.

    Keys and shapes come from the headers; a tensor is read when it is indexed. Our layout's
    safetensors files are read with pread (each tensor into its own buffer, freed with it);
    the original's ``pytorch_model.bin`` is memory-mapped (``torch.load(mmap=True)``), or read
    whole when it is in the legacy non-zip format, which cannot be mapped."""
    meta = _reward_meta(directory)
    state = LazyStateDict()
    try:
        if meta is None:
            state.add_torch_file(_original_checkpoint_path(directory))
        else:
            state.add_safetensors(os.path.join(directory, BACKBONE_WEIGHTS_FILE), BACKBONE_PREFIX)
            state.add_safetensors(os.path.join(directory, VALUE_HEAD_FILE))
        yield state, meta
    finally:
        state.close()


class LazyStateDict(Mapping):
    """A checkpoint's state dict that reads a tensor each time it is indexed, one tensor at a time:
    ``load_state_dict_into_model`` then reads each tensor only on the rank that copies it, and no
    rank ever holds the whole checkpoint. ``shape_of(key)`` reads no tensor."""

    def __init__(self):
        self._entries = {}   # key -> (read(name) -> tensor, name in its file, shape)
        self._handles = []

    def add_safetensors(self, path, prefix=""):
        try:
            handle = safe_open(path, framework="pt", backend="pread")
        except TypeError:    # a safetensors without the pread backend: memory-mapped
            handle = safe_open(path, framework="pt")
        self._handles.append(handle)
        for name in handle.keys():
            shape = tuple(handle.get_slice(name).get_shape())
            self._entries[prefix + name] = (handle.get_tensor, name, shape)

    def add_torch_file(self, path):
        mmap = zipfile.is_zipfile(path)   # the legacy format cannot be mapped: read whole
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(state_dict, dict):
            raise UserError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
        self._handles.append(state_dict)
        for name, tensor in state_dict.items():
            self._entries[name] = (state_dict.__getitem__, name, tuple(tensor.shape))

    def shape_of(self, key):
        return self._entries[key][2]

    def __getitem__(self, key):
        read, name, _ = self._entries[key]
        return read(name)

    def __contains__(self, key):
        return key in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def close(self):
        """Close the files (the keys and shapes stay; reading a tensor afterwards fails)."""
        for handle in self._handles:
            if isinstance(handle, dict):
                handle.clear()
            else:
                handle.__exit__(None, None, None)
        self._handles = []


def _shape_of(state_dict, key):
    shape_of = getattr(state_dict, "shape_of", None)
    return tuple(shape_of(key) if shape_of is not None else state_dict[key].shape)


def _tolerated_backbone_keys(backbone):
    """Regexes (for unprefixed backbone keys) of keys HF's own loader forgives: (missing, unexpected).

    The class's _keys_to_ignore_on_load_{missing,unexpected}, plus, as transformers does, the legacy
    persistent ``rotary_emb.inv_freq`` / ``position_ids`` buffers when the model still has such buffers.
    """
    missing = set(getattr(backbone, "_keys_to_ignore_on_load_missing", None) or ())
    unexpected = set(getattr(backbone, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffer_names = [name for name, _ in backbone.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffer_names):
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffer_names):
        unexpected.add(r"(^|\.)position_ids$")
    return missing, unexpected


def check_reward_state_dict_keys(model, state_dict, source=None):
    """Raise UserError naming the missing, unexpected and wrong-shaped keys (the original ignored them);
    `source`: the checkpoint's path, named in the message. `state_dict`: a dict or a LazyStateDict
    (whose shapes are read without reading a tensor).

    Forgiven: a missing key that is a tied alias of a parameter whose other name is present
    (``named_parameters`` drops duplicates, as the original's ZeRO-3 save did), and backbone keys HF's
    loader itself forgives (``_tolerated_backbone_keys``). ``v_head.weight`` is never forgiven.
    Shapes compare against ``ds_shape`` for ZeRO-3-partitioned parameters.
    After this passes, ``model.load_state_dict(state_dict, strict=False)`` loads every weight.
    """
    expected = model.state_dict(keep_vars=True)
    ignore_missing, ignore_unexpected = _tolerated_backbone_keys(model.rwtranrsformer)

    def forgiven(key, patterns):
        return (key.startswith(BACKBONE_PREFIX)
                and any(re.search(p, key[len(BACKBONE_PREFIX):]) for p in patterns))

    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    names_of = {name: names for names in aliases.values() for name in names}

    missing = [k for k in expected if k not in state_dict
               and not any(alias in state_dict for alias in names_of.get(k, ()))
               and not forgiven(k, ignore_missing)]
    unexpected = [k for k in state_dict if k not in expected and not forgiven(k, ignore_unexpected)]
    wrong_shape = []
    for key in state_dict.keys() & expected.keys():
        want = tuple(getattr(expected[key], "ds_shape", expected[key].shape))
        if _shape_of(state_dict, key) != want:
            wrong_shape.append(f"{key}: checkpoint {_shape_of(state_dict, key)} vs model {want}")
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_some(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_some(sorted(unexpected))}")
        if wrong_shape:
            parts.append(f"wrong shapes: {_some(sorted(wrong_shape))}")
        where = f"{source}: " if source else ""
        raise UserError(f"{where}reward-model checkpoint does not match the model: " + "; ".join(parts))


def _some(items, limit=8):
    """str(items), or its first `limit` entries and how many more (an error stays one short line)."""
    return str(items) if len(items) <= limit else f"{items[:limit]} and {len(items) - limit} more"
