"""Split indices, per-phase tokenisation, the array cache, collators and MiniDataset."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from utils.errors import UserError
from utils.data import data_utils
from utils.data.data_utils import (IGNORE_INDEX, DataCollatorReward, DataCollatorRLHF, MiniDataset,
                                   PromptDataset, create_dataset, create_prompt_dataset,
                                   get_unsupervised_data, load_cache, prompt_dataset_cache_key,
                                   sft_labels, tokenize_phase1, tokenize_phase2, tokenize_phase3)
from utils.data.splits import get_shuffle_idx, split_boundaries, split_indices


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the `datasets` arrow cache out of the home directory."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def load_tokenizer(path):
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="module")
def opt_tok(tiny_opt_path):
    return load_tokenizer(tiny_opt_path)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_path):
    return load_tokenizer(tiny_llama_path)


@pytest.fixture(params=["opt", "llama"])
def tok(request, opt_tok, llama_tok):
    return {"opt": opt_tok, "llama": llama_tok}[request.param]


def ids_of(tok, text):
    return tok(text)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Split indices
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_split,size,expected", [
    ("2,4,4", 10, [0, 2, 6, 10]),         # 2.0, 4.0, 4.0: exact
    ("6,2,2", 10, [0, 6, 8, 10]),         # 6.0, 2.0, 2.0: exact
    ("2,4,4", 7, [0, 1, 4, 7]),           # round(1.4)=1, round(2.8)=3, round(2.8)=3 -> 7, diff 0
    ("1,1", 5, [0, 3, 5]),                # round(2.5)=2 twice (banker's) -> [0,2,4], diff -1 -> [0,3,5]
    ("1,1,1,1", 10, [0, 4, 6, 8, 10]),    # round(2.5)=2 x4 -> [0,2,4,6,8], diff -2 shifts every inner boundary
    ("10,0,0", 3, [0, 3, 3, 3]),
])
def test_split_boundaries_by_hand(data_split, size, expected):
    assert split_boundaries(data_split, size) == expected


def reference_split(data_split, part, size, seed):
    """Straight transcription of the original's numpy procedure."""
    proportions = [float(s) for s in data_split.split(",")]
    proportions = [p / sum(proportions) for p in proportions]
    index = [0]
    for i, p in enumerate(proportions):
        index.append(index[i] + int(round(p * float(size))))
    diff = index[-1] - size
    for i in range(1, len(index)):
        index[i] -= diff
    perm = np.arange(size, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(perm)
    return perm[index[part]:index[part + 1]].tolist()


@pytest.mark.parametrize("data_split,size,seed", [("2,4,4", 10, 1234), ("6,2,2", 97, 0), ("1,1", 5, 42),
                                                   ("9,1", 1001, 7), ("3,3,4", 1, 1234), ("2,4,4", 0, 1)])
def test_split_indices_partition_and_match_reference(data_split, size, seed):
    parts = [split_indices(data_split, k, size, seed) for k in range(len(data_split.split(",")))]
    assert sorted(i for part in parts for i in part) == list(range(size))     # disjoint and covering
    bounds = split_boundaries(data_split, size)
    assert [len(p) for p in parts] == [b - a for a, b in zip(bounds, bounds[1:])]
    assert parts == [reference_split(data_split, k, size, seed) for k in range(len(parts))]
    assert parts == [split_indices(data_split, k, size, seed) for k in range(len(parts))]  # reproducible


def test_split_depends_on_seed_and_shuffle_dtype():
    assert split_indices("2,4,4", 0, 100, 1) != split_indices("2,4,4", 0, 100, 2)
    assert get_shuffle_idx(0, 10).dtype == np.uint32
    assert sorted(get_shuffle_idx(0, 10).tolist()) == list(range(10))


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------

def test_sft_labels_by_hand():
    # pad = eos = 2; OPT's BOS (also 2) sits inside the prompt and does not count.
    input_ids = np.array([2, 5, 6, 7, 2, 2, 2])
    assert sft_labels(input_ids, 2, 2).tolist() == [-100, -100, 6, 7, 2, -100, -100]
    assert sft_labels(np.array([2, 5, 6, 7, 8]), 2, 2).tolist() == [-100, -100, 6, 7, 8]   # truncated: no eos
    assert sft_labels(np.array([2, 5, 6, 7, 2]), 3, 2).tolist() == [-100, -100, -100, 7, 2]  # one eos, kept


def test_phase1_tokenization(tok):
    prompt, answer, L = " Human: Tell me a story. Assistant:", " The dog and the cat.", 32
    enc = tok(prompt + answer + tok.eos_token, max_length=L, padding="max_length", truncation=True)
    arrays = tokenize_phase1([prompt], [prompt + answer], tok, L, tok.eos_token)
    ids, labels = arrays["input_ids"][0], arrays["labels"][0]
    assert ids.tolist() == enc["input_ids"] and arrays["attention_mask"][0].tolist() == enc["attention_mask"]
    n_prompt, n_real = len(ids_of(tok, prompt)), sum(enc["attention_mask"])
    assert ids[n_real - 1] == tok.eos_token_id and n_real < L
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert labels[n_prompt:n_real].tolist() == ids[n_prompt:n_real].tolist()  # answer and its eos are targets
    assert (labels[n_real:] == IGNORE_INDEX).all()                          # padding is not


def test_phase1_drops_prompts_that_fill_max_seq_len(tok):
    prompt, answer = " Human: Tell me a story. Assistant:", " The dog."
    n_prompt = len(ids_of(tok, prompt))
    assert len(tokenize_phase1([prompt], [prompt + answer], tok, n_prompt, tok.eos_token)["input_ids"]) == 0
    kept = tokenize_phase1([prompt], [prompt + answer], tok, n_prompt + 1, tok.eos_token)
    assert kept["labels"].tolist() == [[IGNORE_INDEX] * n_prompt + [kept["input_ids"][0, -1]]]


def test_batched_equals_per_row(tok, monkeypatch):
    monkeypatch.setattr(data_utils, "_TOKENIZE_CHUNK", 2)
    prompts = [" Human: Hi? Assistant:", " Human: Tell me about the moon and the sun. Assistant:",
               " Human: Why? Assistant:"]
    full = [p + a for p, a in zip(prompts, [" Yes.", " It is a very long answer about the sky.", " No."])]
    for fn, args in ((tokenize_phase1, (prompts, full)), (tokenize_phase2, (full, full[::-1]))):
        batched = fn(*args, tok, 16, tok.eos_token)
        rows = [fn(*[[a[i]] for a in args], tok, 16, tok.eos_token) for i in range(3)]
        for name, array in batched.items():
            assert array.tolist() == [r for row in rows for r in row[name].tolist()], name
    batched = tokenize_phase3(prompts, tok, 8)
    rows = [tokenize_phase3([p], tok, 8) for p in prompts]
    assert batched["input_ids"].tolist() == [row["input_ids"][0].tolist() for row in rows]


def test_phase2_items(tok):
    chosen, rejected = " Human: Hi? Assistant: Yes.", " Human: Hi? Assistant: No, never."
    data = PromptDataset(tokenize_phase2([chosen], [rejected], tok, 32, tok.eos_token), 2, tok.pad_token_id)
    chosen_ids, chosen_mask, rejected_ids, rejected_mask = data[0]
    for t in data[0]:
        assert t.shape == (1, 32) and t.dtype == torch.long
    assert chosen_ids[0].tolist() == tok(chosen + tok.eos_token, max_length=32, padding="max_length")["input_ids"]
    n_rejected = len(ids_of(tok, rejected + tok.eos_token))
    assert rejected_mask[0].tolist() == [1] * n_rejected + [0] * (32 - n_rejected)
    assert rejected_ids[0, n_rejected - 1] == tok.eos_token_id


def test_phase3_reversal_and_left_truncation(tok):
    short, L = " Human: Hi? Assistant:", 16
    long = " Human: Tell me about the moon and the sun and the river and the sky. Assistant:"
    short_ids, long_ids = ids_of(tok, short), ids_of(tok, long)
    assert len(short_ids) < L < len(long_ids)
    exact = short_ids[:]
    data = PromptDataset(tokenize_phase3([short, long], tok, L), 3, tok.pad_token_id)
    ids, mask, pad = data[0]
    assert ids.tolist() == short_ids[::-1] and mask.tolist() == [1] * len(short_ids) and pad == tok.pad_token_id
    ids, mask, _ = data[1]
    assert ids.tolist() == long_ids[-(L - 1):][::-1]          # last L-1 tokens: the original's off-by-one
    assert len(mask) == L - 1
    # A prompt of exactly max_seq_len tokens is kept whole (BOS included).
    ids, _, _ = PromptDataset(tokenize_phase3([short], tok, len(exact)), 3, tok.pad_token_id)[0]
    assert ids.tolist() == exact[::-1]


def test_pad_must_equal_eos(tiny_llama_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    tok.pad_token = tok.unk_token
    with pytest.raises(ValueError, match="pad == eos"):
        data_utils.create_dataset_split([], None, 1, tok, tok.eos_token, 8)


# ---------------------------------------------------------------------------------------------
# create_prompt_dataset and the cache
# ---------------------------------------------------------------------------------------------

def write_jsonfile(root, n_train=20, n_eval=10, tag=""):
    """A local/jsonfile dataset directory: <root>/local/jsonfile/data/{train,eval}.json."""
    path = os.path.join(str(root), "local", "jsonfile")
    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    for name, n in (("train", n_train), ("eval", n_eval)):
        rows = [{"prompt": f"Human: question {tag}{name} {i} about the moon? Assistant:",
                 "chosen": f"The answer {i} is yes.", "rejected": None if i % 5 == 4 else f"No {i}."}
                for i in range(n)]
        with open(os.path.join(path, "data", f"{name}.json"), "w") as f:
            json.dump(rows, f)
    return path


def as_lists(dataset):
    def plain(item):
        if isinstance(item, dict):
            return {k: v.tolist() for k, v in item.items()}
        return [v.tolist() if torch.is_tensor(v) else v for v in item]
    return [plain(dataset[i]) for i in range(len(dataset))]


def test_create_prompt_dataset_phases(tmp_path, opt_tok):
    path, out = write_jsonfile(tmp_path / "d"), str(tmp_path / "out")
    n_part = [len(split_indices("2,4,4", k, 20, 1234)) for k in range(3)]
    train, _ = create_prompt_dataset(0, [path], "2,4,4", out, 1, 1234, opt_tok, 32)
    assert len(train) == n_part[0] and set(train[0]) == {"input_ids", "attention_mask", "labels"}
    train, _ = create_prompt_dataset(0, [path], "2,4,4", out, 2, 1234, opt_tok, 32)
    rows = [i for i in split_indices("2,4,4", 1, 20, 1234) if i % 5 != 4]   # phase 2 needs a rejected answer
    assert len(train) == len(rows)
    first_chosen = f" Human: question train {rows[0]} about the moon? Assistant: The answer {rows[0]} is yes."
    assert train[0][0][0].tolist() == opt_tok(first_chosen + "</s>", max_length=32, padding="max_length")["input_ids"]
    train, eval_ = create_prompt_dataset(0, [path], "2,4,4", out, 3, 1234, opt_tok, 32)
    assert len(train) == n_part[2] and len(eval_) == len(split_indices("2,4,4", 2, 10, 1234))
    ids, mask, pad = train[0]
    prompt = f" Human: question train {split_indices('2,4,4', 2, 20, 1234)[0]} about the moon? Assistant:"
    assert ids.tolist() == ids_of(opt_tok, prompt)[::-1] and pad == opt_tok.pad_token_id


def test_cache_hit_and_not_pickled(tmp_path, opt_tok, capsys):
    path, out = write_jsonfile(tmp_path / "d"), str(tmp_path / "out")
    first = create_prompt_dataset(0, [path], "2,4,4", out, 1, 1234, opt_tok, 32)
    assert "[data] cache miss" in capsys.readouterr().out
    second = create_prompt_dataset(0, [path], "2,4,4", out, 1, 1234, opt_tok, 32)
    log = capsys.readouterr().out
    key = prompt_dataset_cache_key([path], "2,4,4", 1, 1234, opt_tok, 32, "</s>")
    assert f"[data] cache hit {key}" in log
    assert [as_lists(d) for d in first] == [as_lists(d) for d in second]
    create_prompt_dataset(0, [path], "2,4,4", out, 1, 1234, opt_tok, 32, reload=True)
    assert "cache rebuild" in capsys.readouterr().out

    cache_file = os.path.join(out, f"promptdata_{key}.npz")
    assert os.listdir(out) == [os.path.basename(cache_file)]       # no temp files left behind
    with np.load(cache_file, allow_pickle=False) as npz:           # plain data: no pickles anywhere
        assert npz["train.input_ids"].shape == (len(first[0]), 32)
    train, eval_, meta = load_cache(cache_file)
    assert meta["key"] == key and meta["pad_token_id"] == 2 and set(train) == {"input_ids", "attention_mask", "labels"}


def test_cache_key_changes_with_every_input(tmp_path, opt_tok, llama_tok, tiny_opt_path):
    path = write_jsonfile(tmp_path / "d")
    base = dict(data_path=[path], data_split="2,4,4", train_phase=1, seed=1234, tokenizer=opt_tok,
                max_seq_len=32, end_of_conversation_token="</s>")
    key = prompt_dataset_cache_key(**base)
    assert prompt_dataset_cache_key(**base) == key
    grown = load_tokenizer(tiny_opt_path)
    grown.add_tokens(["<extra>"])
    for change in (dict(data_split="6,2,2"), dict(train_phase=2), dict(seed=1), dict(max_seq_len=64),
                   dict(tokenizer=llama_tok), dict(tokenizer=grown), dict(end_of_conversation_token="<eot>")):
        assert prompt_dataset_cache_key(**dict(base, **change)) != key, change
    write_jsonfile(tmp_path / "d", n_train=21)                    # the data file's content changes
    assert prompt_dataset_cache_key(**base) != key


def test_several_datasets_are_concatenated_then_permuted(tmp_path, opt_tok):
    a, b = write_jsonfile(tmp_path / "a", tag="a"), write_jsonfile(tmp_path / "b", 10, 6, tag="b")
    train, eval_ = create_prompt_dataset(0, [a, b], "2,4,4", str(tmp_path / "out"), 3, 1234, opt_tok, 32)
    parts = [create_dataset(0, p, "2,4,4", None, 3, 1234, opt_tok, "</s>", 32) for p in (a, b)]
    for got, split in ((train, 0), (eval_, 1)):
        expected = data_utils._concat([p[split] for p in parts])
        expected = data_utils._take(expected, get_shuffle_idx(1234, data_utils.num_rows(expected)))
        assert as_lists(got) == as_lists(PromptDataset(expected, 3, opt_tok.pad_token_id))


def test_sft_only_data_joins_phase1_only(tmp_path, opt_tok):
    main, sft = write_jsonfile(tmp_path / "a"), write_jsonfile(tmp_path / "b", 7, 3, tag="sft")
    out = str(tmp_path / "out")
    train, eval_ = create_prompt_dataset(0, [main], "2,4,4", out, 1, 1234, opt_tok, 32, sft_only_data_path=[sft])
    assert len(train) == len(split_indices("2,4,4", 0, 20, 1234)) + 7
    assert len(eval_) == len(split_indices("2,4,4", 0, 10, 1234)) + 3
    train3, _ = create_prompt_dataset(0, [main], "2,4,4", out, 3, 1234, opt_tok, 32, sft_only_data_path=[sft])
    assert len(train3) == len(split_indices("2,4,4", 2, 20, 1234))


def _two_rank_worker(rank, init_file, tokenizer_path, data_path, out, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train, _ = create_prompt_dataset(rank, [data_path], "2,4,4", out, 3, 1234, load_tokenizer(tokenizer_path), 32)
        with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
            json.dump(as_lists(train), f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_build_once_and_share(tmp_path, tiny_opt_path):
    data_path, out, results = write_jsonfile(tmp_path / "d"), str(tmp_path / "out"), tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(_two_rank_worker, nprocs=2,
                                args=(str(tmp_path / "init"), tiny_opt_path, data_path, out, str(results)))
    rank0, rank1 = (json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and len(rank0) == len(split_indices("2,4,4", 2, 20, 1234))
    assert len(os.listdir(out)) == 1


def test_missing_dataset_fails_before_building(tmp_path, opt_tok):
    with pytest.raises(UserError, match="never downloads"):
        create_prompt_dataset(0, ["Dahoas/rm-static"], "2,4,4", str(tmp_path), 1, 1234, opt_tok, 32)


# ---------------------------------------------------------------------------------------------
# Collators and MiniDataset
# ---------------------------------------------------------------------------------------------

def test_data_collator_reward():
    items = [(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), torch.tensor([[3, 4]]), torch.tensor([[1, 0]])),
             (torch.tensor([[5, 6]]), torch.tensor([[1, 0]]), torch.tensor([[7, 8]]), torch.tensor([[1, 1]]))]
    batch = DataCollatorReward()(items)
    assert batch["input_ids"].tolist() == [[1, 2], [5, 6], [3, 4], [7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0], [1, 0], [1, 1]]


def test_data_collator_rlhf_left_pads_to_max_token_len():
    pad = 2
    items = [(torch.tensor([5, 4, 3]), torch.ones(3, dtype=torch.long), pad),   # prompt [3, 4, 5], reversed
             (torch.tensor([9]), torch.ones(1, dtype=torch.long), pad)]
    batch = DataCollatorRLHF(max_token_len=5)(items)
    assert batch["prompt"].tolist() == [[2, 2, 3, 4, 5], [2, 2, 2, 2, 9]]
    assert batch["prompt_att_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    batch = DataCollatorRLHF(max_token_len=2)(items)             # never truncates
    assert batch["prompt"].tolist() == [[3, 4, 5], [2, 2, 9]]


def test_mini_dataset():
    mini = MiniDataset(max_size=2, small_batch_size=2)
    assert mini.add({"a": torch.arange(3), "b": torch.arange(3) * 10}) is None
    out = mini.add([torch.arange(4), torch.arange(4) + 100])
    assert [type(x) for x in out] == [dict, dict, list, list]
    assert out[1]["a"].tolist() == [2] and out[1]["b"].tolist() == [20]
    assert out[3][1].tolist() == [102, 103]
    assert mini.dataset == []
    assert [t.tolist() for t in MiniDataset(1, 3).add(torch.arange(5))] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="full"):
        MiniDataset(0, 1).add(torch.arange(2))


# ---------------------------------------------------------------------------------------------
# Unsupervised data
# ---------------------------------------------------------------------------------------------

def test_unsupervised_data_blocks(tmp_path, opt_tok):
    lines = [f"the cat and the dog {i} went to the river" for i in range(6)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(unsupervised_dataset_name=str(corpus), unsupervised_dataset_config_name=None,
                              preprocessing_num_workers=None, max_prompt_seq_len=4, max_answer_seq_len=4)
    blocks = get_unsupervised_data(args, opt_tok)
    total = sum(len(ids_of(opt_tok, line)) for line in lines)
    assert len(blocks) == total // 8
    tokens = [t for line in lines for t in ids_of(opt_tok, line)]
    assert [row["input_ids"] for row in blocks] == [tokens[i:i + 8] for i in range(0, total // 8 * 8, 8)]
    assert all(row["labels"] == row["input_ids"] for row in blocks)
