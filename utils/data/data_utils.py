"""Split, tokenise, cache and collate the prompt datasets of the three phases.

A tokenised split is held as a dict of numpy arrays with one row per sample ("arrays" below):
    phase 1: input_ids, attention_mask, labels                      [N, max_seq_len]
    phase 2: chosen_ids, chosen_mask, rejected_ids, rejected_mask   [N, max_seq_len]
    phase 3: input_ids [N, max_seq_len] (prompt left-aligned, pad after), prompt_len [N]
Concatenating and permuting datasets are then plain numpy indexing, and the cache is these arrays
in an .npz file (data, not pickles). `PromptDataset` builds each phase's items from them lazily.
"""
import hashlib
import itertools
import json
import os
import tempfile

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from utils.data.raw_datasets import BadRow, get_raw_dataset, load_local_dataset, local_data_files
from utils.data.splits import get_shuffle_idx, split_indices
from utils.errors import UserError
from utils.utils import print_rank_0

IGNORE_INDEX = -100
CACHE_FORMAT_VERSION = 1
_TOKENIZE_CHUNK = 1024  # rows per tokenizer call
_ID_DTYPE, _MASK_DTYPE = np.int32, np.uint8


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------

def _check_pad_is_eos(tokenizer):
    # Label masking (first pad after the prompt = the appended EOS) and the step-3 collator rely on it.
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        raise ValueError(f"The data pipeline needs pad == eos, got pad {tokenizer.pad_token!r} "
                         f"(id {tokenizer.pad_token_id}) and eos {tokenizer.eos_token!r} (id "
                         f"{tokenizer.eos_token_id}); set tokenizer.pad_token = tokenizer.eos_token.")


def _chunks(items):
    for start in range(0, len(items), _TOKENIZE_CHUNK):
        yield items[start:start + _TOKENIZE_CHUNK]


def _encode_padded(tokenizer, texts, max_seq_len):
    """(ids, mask) [len(texts), max_seq_len]: right padding to max_seq_len, right truncation."""
    ids = np.zeros((len(texts), max_seq_len), _ID_DTYPE)
    mask = np.zeros((len(texts), max_seq_len), _MASK_DTYPE)
    row = 0
    for chunk in _chunks(texts):
        enc = tokenizer(chunk, max_length=max_seq_len, padding="max_length", truncation=True,
                        padding_side="right")
        ids[row:row + len(chunk)] = enc["input_ids"]
        mask[row:row + len(chunk)] = enc["attention_mask"]
        row += len(chunk)
    return ids, mask


def _encode_lengths(tokenizer, texts, max_length=None):
    """Token ids of each text alone (no padding; right truncation at max_length if given)."""
    out = []
    for chunk in _chunks(texts):
        kwargs = dict(max_length=max_length, truncation=True) if max_length else {}
        out += tokenizer(chunk, **kwargs)["input_ids"]
    return out


def sft_labels(input_ids, prompt_len, pad_token_id):
    """Phase-1 labels [L] for one row: prompt masked, the first EOS after it kept, later pads masked.

    pad == eos, so the first pad-id position after the prompt is the appended EOS (a target)
    and everything from the second one on is padding.
    """
    labels = input_ids.astype(_ID_DTYPE).copy()
    labels[:prompt_len] = IGNORE_INDEX
    pad_positions = np.nonzero(input_ids[prompt_len:] == pad_token_id)[0]
    if len(pad_positions) >= 2:
        labels[prompt_len + pad_positions[1]:] = IGNORE_INDEX
    return labels


def tokenize_phase1(prompts, prompts_and_chosen, tokenizer, max_seq_len, end_of_conversation_token):
    """SFT arrays; a sample whose prompt alone fills max_seq_len is dropped."""
    prompt_lens = np.array([len(ids) for ids in _encode_lengths(tokenizer, prompts, max_seq_len)], np.int64)
    ids, mask = _encode_padded(tokenizer, [t + end_of_conversation_token for t in prompts_and_chosen], max_seq_len)
    keep = prompt_lens != max_seq_len
    ids, mask, prompt_lens = ids[keep], mask[keep], prompt_lens[keep]
    labels = np.stack([sft_labels(row, n, tokenizer.pad_token_id) for row, n in zip(ids, prompt_lens)]) \
        if len(ids) else np.zeros((0, max_seq_len), _ID_DTYPE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenize_phase2(prompts_and_chosen, prompts_and_rejected, tokenizer, max_seq_len, end_of_conversation_token):
    """Reward-model arrays: chosen and rejected conversations, each padded to max_seq_len."""
    chosen_ids, chosen_mask = _encode_padded(
        tokenizer, [t + end_of_conversation_token for t in prompts_and_chosen], max_seq_len)
    rejected_ids, rejected_mask = _encode_padded(
        tokenizer, [t + end_of_conversation_token for t in prompts_and_rejected], max_seq_len)
    return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids, "rejected_mask": rejected_mask}


def tokenize_phase3(prompts, tokenizer, max_seq_len):
    """RL prompt arrays. A prompt longer than max_seq_len keeps only its last max_seq_len - 1 tokens.

    Original quirk kept, so stage-3 prompts match the original's: max_seq_len - 1, not max_seq_len,
    and the BOS is dropped, while a prompt of exactly max_seq_len tokens is kept whole.
    """
    ids = np.full((len(prompts), max_seq_len), tokenizer.pad_token_id, _ID_DTYPE)
    prompt_len = np.zeros(len(prompts), np.int64)
    for row, tokens in enumerate(_encode_lengths(tokenizer, prompts)):
        if len(tokens) > max_seq_len:
            tokens = tokens[-(max_seq_len - 1):]
        ids[row, :len(tokens)] = tokens
        prompt_len[row] = len(tokens)
    return {"input_ids": ids, "prompt_len": prompt_len}


# An adapter that meets a row it cannot read raises BadRow; the others are the same defect seen
# through code that indexes or concatenates (a missing key, None + str, int("x")).
_ROW_ERRORS = (BadRow, KeyError, IndexError, TypeError, ValueError, AttributeError)


class SkippedRows:
    """Rows of one dataset the adapter could not read: how many, and the first one (for the report)."""

    def __init__(self):
        self.count = 0
        self.first = None  # (split, row id, reason)

    def add(self, split, row_id, reason):
        self.count += 1
        if self.first is None:
            self.first = (split, row_id, reason)


class BadRowError(Exception):
    """--strict_data: the first bad row of a split (its id in the split, and why)."""

    def __init__(self, row_id, reason):
        super().__init__(f"row {row_id}: {reason}")
        self.row_id, self.reason = row_id, reason


def _reason(err):
    if isinstance(err, BadRow):
        return str(err)
    if isinstance(err, KeyError):
        return f"no column {err.args[0]!r}" if err.args else "a missing column"
    return f"unreadable ({type(err).__name__}: {err})"


def adapted_rows(rows, getters, row_ids=None, skipped=None, split="train", strict=False):
    """[tuple of getter(row) for each getter] of the rows where each is a string.

    A None from a getter drops the row silently (the adapter's "no such text", as the original);
    a row a getter cannot read (_ROW_ERRORS, or a non-string result) is dropped and counted in
    `skipped`, or, with `strict`, raises BadRowError. row_ids: ids of `rows` in their split.
    """
    out = []
    for i, row in enumerate(rows):
        row_id = row_ids[i] if row_ids is not None else i
        try:
            values = tuple(get(row) for get in getters)
            wrong = [v for v in values if v is not None and not isinstance(v, str)]
            if wrong:
                raise BadRow(f"a text is {type(wrong[0]).__name__}, not a string")
        except _ROW_ERRORS as err:
            if strict:
                raise BadRowError(row_id, _reason(err)) from None
            if skipped is not None:
                skipped.add(split, row_id, _reason(err))
            continue
        if all(v is not None for v in values):
            out.append(values)
    return out


def create_dataset_split(current_dataset, raw_dataset, train_phase, tokenizer, end_of_conversation_token,
                         max_seq_len, row_ids=None, skipped=None, split="train", strict=False):
    """Arrays of one split: the rows of `current_dataset` mapped by the adapter `raw_dataset`
    (unreadable rows skipped into `skipped`, or BadRowError with `strict`; see adapted_rows)."""
    _check_pad_is_eos(tokenizer)
    adapt = lambda *getters: adapted_rows(current_dataset, getters, row_ids, skipped, split, strict)  # noqa: E731
    if train_phase == 1:
        pairs = adapt(raw_dataset.get_prompt_and_chosen, raw_dataset.get_prompt)
        return tokenize_phase1([p for _, p in pairs], [t for t, _ in pairs], tokenizer, max_seq_len,
                               end_of_conversation_token)
    if train_phase == 2:
        pairs = adapt(raw_dataset.get_prompt_and_chosen, raw_dataset.get_prompt_and_rejected)
        return tokenize_phase2([c for c, _ in pairs], [r for _, r in pairs], tokenizer, max_seq_len,
                               end_of_conversation_token)
    if train_phase == 3:
        prompts = [p for (p,) in adapt(raw_dataset.get_prompt)]
        return tokenize_phase3(prompts, tokenizer, max_seq_len)
    raise ValueError(f"train_phase must be 1, 2 or 3, got {train_phase}")


def num_rows(arrays):
    return len(next(iter(arrays.values())))


class PromptDataset(Dataset):
    """The items of each phase, built lazily from the arrays of one split.

    phase 1: {input_ids, attention_mask, labels}, each LongTensor [max_seq_len]
    phase 2: (chosen_ids, chosen_mask, rejected_ids, rejected_mask), each LongTensor [1, max_seq_len]
    phase 3: (reversed prompt ids [n], reversed mask [n] (all ones), pad_token_id)
    """

    def __init__(self, arrays, train_phase, pad_token_id):
        self.arrays = arrays
        self.train_phase = train_phase
        self.pad_token_id = pad_token_id

    def __len__(self):
        return num_rows(self.arrays)

    def _row(self, name, idx):
        return torch.from_numpy(self.arrays[name][idx].astype(np.int64))

    def __getitem__(self, idx):
        if self.train_phase == 1:
            return {name: self._row(name, idx) for name in ("input_ids", "attention_mask", "labels")}
        if self.train_phase == 2:
            return tuple(self._row(name, idx).unsqueeze(0)
                         for name in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"))
        n = int(self.arrays["prompt_len"][idx])
        ids = self._row("input_ids", idx)[:n].flip(0)
        return ids, torch.ones_like(ids), self.pad_token_id


# ----------------------------------------------------------------------------------------------
# Building, concatenating, caching
# ----------------------------------------------------------------------------------------------

def _concat(parts):
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _take(arrays, idx):
    idx = np.asarray(idx, dtype=np.int64)
    return {name: array[idx] for name, array in arrays.items()}


def create_dataset(local_rank, dataset_name, data_split, output_path, train_phase, seed, tokenizer,
                   end_of_conversation_token, max_seq_len, strict=False, report=None):
    """(train arrays, eval arrays) of part `train_phase - 1` of one dataset's train and eval splits.

    Unreadable rows are skipped and reported once for the dataset (into `report`, a list of dicts,
    when given); with `strict` the first one is a UserError naming its file and row.
    """
    raw_dataset = get_raw_dataset(dataset_name, output_path, seed, local_rank)
    skipped, total, splits = SkippedRows(), 0, []
    for which in ("train", "eval"):
        data, split, ids = raw_dataset.split_rows(which)
        part_ids = split_indices(data_split, train_phase - 1, len(data), seed)
        row_ids = [ids[i] for i in part_ids] if ids is not None else part_ids
        total += len(part_ids)
        try:
            splits.append(create_dataset_split(data.select(part_ids), raw_dataset, train_phase, tokenizer,
                                               end_of_conversation_token, max_seq_len, row_ids=row_ids,
                                               skipped=skipped, split=split, strict=strict))
        except BadRowError as err:
            raise UserError(f"{raw_dataset.row_location(split, err.row_id)}: {err.reason} "
                            f"(--strict_data)") from None
    if skipped.count:
        split, row_id, reason = skipped.first
        entry = {"dataset": dataset_name, "skipped": skipped.count, "rows": total,
                 "first": f"{raw_dataset.row_location(split, row_id)}: {reason}"}
        _warn_skipped(entry)
        if report is not None:
            report.append(entry)
    return tuple(splits)


def _warn_skipped(entry):
    print_rank_0(f"[data] warning: {entry['dataset']}: skipped {entry['skipped']} of {entry['rows']} "
                 f"rows the adapter cannot read (first: {entry['first']}); --strict_data makes this "
                 f"an error")


def _build_arrays(local_rank, data_path, data_split, output_path, train_phase, seed, tokenizer, max_seq_len,
                  end_of_conversation_token, sft_only_data_path, strict=False, report=None):
    """(train, eval) arrays: datasets concatenated then permuted by get_shuffle_idx(seed, size)."""
    def build(path, split):
        return create_dataset(local_rank, path, split, output_path, train_phase, seed, tokenizer,
                              end_of_conversation_token, max_seq_len, strict=strict, report=report)

    built = [build(path, data_split) for path in data_path]
    train, eval_ = _concat([t for t, _ in built]), _concat([e for _, e in built])
    if len(built) > 1:
        train = _take(train, get_shuffle_idx(seed, num_rows(train)))
        eval_ = _take(eval_, get_shuffle_idx(seed, num_rows(eval_)))
    if train_phase == 1 and sft_only_data_path:
        # SFT-only datasets contribute all their rows ("10,0,0") to phase 1 only.
        sft = [build(path, "10,0,0") for path in sft_only_data_path]
        train = _concat([train] + [t for t, _ in sft])
        eval_ = _concat([eval_] + [e for _, e in sft])
        train = _take(train, get_shuffle_idx(seed, num_rows(train)))
        eval_ = _take(eval_, get_shuffle_idx(seed, num_rows(eval_)))
    return train, eval_


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer):
    """What the tokenizer would produce: class, vocabulary, special tokens, pipeline and a probe encoding."""
    fingerprint = {
        "class": type(tokenizer).__name__,
        "vocab": _sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False)),
        "special": {name: [getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)]
                    for name in ("bos", "eos", "pad", "unk")},
        "probe": tokenizer(" Human: Why? Assistant: Because.")["input_ids"],
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation/padding are call-time settings the backend keeps from its last call.
        state.pop("truncation", None)
        state.pop("padding", None)
        fingerprint["backend"] = _sha256(json.dumps(state, sort_keys=True, ensure_ascii=False))
    return fingerprint


def _files_fingerprint(dataset_name):
    files = []
    for path in local_data_files(dataset_name):
        stat = os.stat(path)
        files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return files


def prompt_dataset_cache_key(data_path, data_split, train_phase, seed, tokenizer, max_seq_len,
                             end_of_conversation_token, sft_only_data_path=()):
    """sha256 over everything the cached arrays depend on: the data files (size, mtime), every
    preprocessing argument, the tokenizer's content and the cache format version."""
    fields = {
        "format_version": CACHE_FORMAT_VERSION,
        "data_path": [[path, _files_fingerprint(path)] for path in data_path],
        "sft_only_data_path": [[path, _files_fingerprint(path)] for path in sft_only_data_path]
        if train_phase == 1 else [],
        "data_split": data_split,
        "train_phase": train_phase,
        "seed": seed,
        "max_seq_len": max_seq_len,
        "end_of_conversation_token": end_of_conversation_token,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return _sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False))


def _save_cache(path, train, eval_, meta):
    """Write the arrays as an .npz (no pickles) to a temp file, then rename it into place."""
    arrays = {f"train.{k}": v for k, v in train.items()}
    arrays.update({f"eval.{k}": v for k, v in eval_.items()})
    arrays["meta"] = np.array(json.dumps(meta))  # a unicode array, not an object array
    fd, tmp = tempfile.mkstemp(prefix=".promptdata-", suffix=".npz.tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_cache(path):
    """(train arrays, eval arrays, meta) from a cache file written by create_prompt_dataset."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        splits = {"train": {}, "eval": {}}
        for name in npz.files:
            if name != "meta":
                split, key = name.split(".", 1)
                splits[split][key] = npz[name]
    return splits["train"], splits["eval"], meta


def _agree_on_error(error):
    """The first non-None of every rank's `error` (None when all succeeded); the ranks' meeting
    point after the build, in place of a barrier, so a rank 0 that failed does not leave the others
    waiting (they raise the same error). Every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _check_not_empty(train, eval_, required, data_path, data_split, train_phase, skipped):
    for name, arrays in (("train", train), ("eval", eval_)):
        if name in required and num_rows(arrays) == 0:
            why = (f"; {sum(e['skipped'] for e in skipped)} unreadable rows were skipped (first: "
                   f"{skipped[0]['first']})" if skipped else "")
            raise UserError(f"--data_split {data_split} leaves phase {train_phase} no {name} rows from "
                            f"{', '.join(data_path)}{why}")


def create_prompt_dataset(local_rank, data_path, data_split, output_path, train_phase, seed, tokenizer,
                          max_seq_len, end_of_conversation_token=None, sft_only_data_path=(), reload=False,
                          strict_data=False, required=("train", "eval")):
    """(train, eval) PromptDatasets of phase `train_phase`, cached under `output_path`.

    Local rank 0 builds on a miss (or `reload`) and writes the cache atomically; other ranks
    wait and read it. The original torch.save'd dataset objects (pickles, which torch >= 2.6
    refuses to load by default); we store the token arrays.

    Bad input is a UserError on every rank: a dataset rank 0 cannot read (the other ranks get its
    message instead of waiting forever), a row the adapter cannot read with `strict_data` (also on
    a cache hit: the cache remembers the rows it skipped), and an empty `required` split.
    """
    if end_of_conversation_token is None:
        end_of_conversation_token = tokenizer.eos_token
    data_path = [data_path] if isinstance(data_path, str) else list(data_path)
    sft_only_data_path = [sft_only_data_path] if isinstance(sft_only_data_path, str) else list(sft_only_data_path or ())
    _check_pad_is_eos(tokenizer)
    key = prompt_dataset_cache_key(data_path, data_split, train_phase, seed, tokenizer, max_seq_len,
                                   end_of_conversation_token, sft_only_data_path)
    os.makedirs(output_path, exist_ok=True)
    cache_file = os.path.join(output_path, f"promptdata_{key}.npz")
    error, hit = None, False
    if local_rank <= 0:
        try:
            if os.path.exists(cache_file) and not reload:
                hit = True
                print_rank_0(f"[data] cache hit {key} {cache_file}")
            else:
                print_rank_0(f"[data] cache {'rebuild (reload)' if reload else 'miss'} {key}: building phase "
                             f"{train_phase} data from {data_path} into {cache_file}")
                skipped = []
                train, eval_ = _build_arrays(local_rank, data_path, data_split, output_path, train_phase,
                                             seed, tokenizer, max_seq_len, end_of_conversation_token,
                                             sft_only_data_path, strict=strict_data, report=skipped)
                meta = {"format_version": CACHE_FORMAT_VERSION, "key": key, "train_phase": train_phase,
                        "pad_token_id": tokenizer.pad_token_id, "max_seq_len": max_seq_len,
                        "skipped": skipped}
                _save_cache(cache_file, train, eval_, meta)
        except UserError as err:
            error = str(err)
        except Exception:
            _agree_on_error(f"building the phase-{train_phase} data failed on local rank 0 (its "
                            f"traceback is in the log)")
            raise
    error = _agree_on_error(error)
    if error is not None:
        raise UserError(error)
    train, eval_, meta = load_cache(cache_file)
    if meta["key"] != key or meta["format_version"] != CACHE_FORMAT_VERSION:
        raise RuntimeError(f"cache file {cache_file} does not hold key {key}; delete it and rerun")
    skipped = meta.get("skipped", [])
    if skipped and strict_data:
        raise UserError(f"{skipped[0]['first']} (--strict_data; the cached data {cache_file} was built "
                        f"skipping {sum(e['skipped'] for e in skipped)} such rows)")
    if hit:
        for entry in skipped:  # the report of the run that built the cache, again
            _warn_skipped(entry)
    _check_not_empty(train, eval_, required, data_path, data_split, train_phase, skipped)
    print_rank_0(f"[data] phase {train_phase}: {num_rows(train)} train / {num_rows(eval_)} eval samples")
    return (PromptDataset(train, train_phase, meta["pad_token_id"]),
            PromptDataset(eval_, train_phase, meta["pad_token_id"]))


# ----------------------------------------------------------------------------------------------
# Collators and MiniDataset
# ----------------------------------------------------------------------------------------------

class DataCollatorReward:
    """Phase 2: input_ids/attention_mask [2B, L], rows 0..B-1 chosen, B..2B-1 rejected."""

    def __call__(self, data):
        return {"input_ids": torch.cat([f[0] for f in data] + [f[2] for f in data], dim=0),
                "attention_mask": torch.cat([f[1] for f in data] + [f[3] for f in data], dim=0)}


class DataCollatorRLHF:
    """Phase 3: prompt/prompt_att_mask [B, max_token_len], left-padded with the pad id (mask 0).

    The items hold reversed prompts: right-pad them, widen to max_token_len, then flip back.
    Longer prompts are not truncated (none are, after tokenize_phase3). inference_tp_size is unused.
    """

    def __init__(self, max_token_len, inference_tp_size=1):
        self.max_token_len = max_token_len
        self.inference_tp_size = inference_tp_size

    def __call__(self, data):
        pad_token_id = data[-1][-1]
        prompt = pad_sequence([f[0] for f in data], padding_value=pad_token_id, batch_first=True)
        prompt_mask = pad_sequence([f[1] for f in data], padding_value=0, batch_first=True)
        pad_length = self.max_token_len - prompt.size(-1)
        if pad_length > 0:
            prompt = F.pad(prompt, pad=(0, pad_length), mode="constant", value=pad_token_id)
            prompt_mask = F.pad(prompt_mask, pad=(0, pad_length), mode="constant", value=0)
        return {"prompt": prompt.flip(1), "prompt_att_mask": prompt_mask.flip(1)}


class MiniDataset:
    """Buffers `max_size` large batches, then returns them cut into micro-batches of `small_batch_size`."""

    def __init__(self, max_size, small_batch_size):
        self.dataset = []
        self.max_size = max_size
        self.small_batch_size = small_batch_size

    def seperate(self):  # the original's spelling; callers use it
        small_dataset = []
        step = self.small_batch_size
        for large_batch in self.dataset:
            if isinstance(large_batch, (list, tuple)):
                size = len(large_batch[0])
                small_dataset += [[x[i:i + step] for x in large_batch] for i in range(0, size, step)]
            elif isinstance(large_batch, dict):
                size = len(next(iter(large_batch.values())))
                small_dataset += [{k: v[i:i + step] for k, v in large_batch.items()} for i in range(0, size, step)]
            else:
                small_dataset += [large_batch[i:i + step] for i in range(0, len(large_batch), step)]
        self.free()
        return small_dataset

    def add(self, data):
        if len(self.dataset) >= self.max_size:
            raise ValueError("The dataset is full but we did not stop it. There is a bug in the code.")
        self.dataset.append(data)
        return self.seperate() if len(self.dataset) == self.max_size else None

    def free(self):
        self.dataset = []


# ----------------------------------------------------------------------------------------------
# Unsupervised data, local only
# ----------------------------------------------------------------------------------------------

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_unsupervised(name, config_name):
    """A local text/json/parquet/csv file, or a local dataset directory (optionally its `config_name` subfolder)."""
    if os.path.isfile(name):
        builder = _BUILDERS.get(os.path.splitext(name)[1])
        if builder is None:
            raise ValueError(f"unsupervised dataset {name!r}: unsupported file type; use one of {sorted(_BUILDERS)}")
        return datasets.load_dataset(builder, data_files={"train": name})
    if config_name and os.path.isdir(os.path.join(name, config_name)):
        name = os.path.join(name, config_name)
    if os.path.isdir(name):
        texts = sorted(f for f in os.listdir(name) if f.endswith(".txt"))
        if texts:
            return datasets.load_dataset("text", data_files={"train": [os.path.join(name, f) for f in texts]})
    return load_local_dataset(name)


def get_unsupervised_data(args, tokenizer):
    """Train split of a local corpus, tokenised and cut into blocks of max_prompt + max_answer tokens.

    Uses args.unsupervised_dataset_name (a local path), args.unsupervised_dataset_config_name,
    args.preprocessing_num_workers, args.max_prompt_seq_len, args.max_answer_seq_len.
    """
    raw = _load_unsupervised(args.unsupervised_dataset_name, args.unsupervised_dataset_config_name)
    column_names = raw["train"].column_names
    text_column = "text" if "text" in column_names else column_names[0]
    block_size = args.max_prompt_seq_len + args.max_answer_seq_len

    def tokenize(examples):
        return tokenizer(examples[text_column])

    def group_texts(examples):
        concatenated = {k: list(itertools.chain.from_iterable(examples[k])) for k in examples}
        total = len(concatenated[next(iter(examples))])
        if total >= block_size:
            total = total // block_size * block_size
        result = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = [list(block) for block in result["input_ids"]]
        return result

    workers = getattr(args, "preprocessing_num_workers", None)
    tokenized = raw.map(tokenize, batched=True, num_proc=workers, remove_columns=column_names,
                        desc="Running tokenizer on dataset")
    grouped = tokenized.map(group_texts, batched=True, num_proc=workers, desc=f"Grouping texts in chunks of {block_size}")
    return grouped["train"]
