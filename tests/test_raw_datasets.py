"""Dataset adapters on a few rows written in each hub dataset's own file layout."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from utils.errors import UserError
from utils.data import raw_datasets
from utils.data.splits import split_indices
from utils.data.raw_datasets import get_raw_dataset


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the `datasets` arrow cache out of the home directory."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


# ---------------------------------------------------------------------------------------------
# Writers for the hub layouts
# ---------------------------------------------------------------------------------------------

def write_parquet(root, split, rows):
    """data/<split>-00000-of-00001.parquet, as the hub serves it."""
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_local_jsonfile(root, train_rows, eval_rows):
    """<root>/data/{train,eval}.json as JSON arrays."""
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        with open(os.path.join(root, "data", f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)


def make_dataset(root, name, train_rows, eval_split=None, eval_rows=None, layout="parquet"):
    path = os.path.join(str(root), name)
    if layout == "parquet":
        write_parquet(path, "train", train_rows)
        if eval_split:
            write_parquet(path, eval_split, eval_rows)
    elif layout == "save_to_disk":
        import datasets
        splits = {"train": datasets.Dataset.from_list(train_rows)}
        if eval_split:
            splits[eval_split] = datasets.Dataset.from_list(eval_rows)
        datasets.DatasetDict(splits).save_to_disk(path)
    return path


def adapter(path, seed=1234):
    return get_raw_dataset(path, output_path=None, seed=seed, local_rank=0)


def texts(ds, row):
    return (ds.get_prompt(row), ds.get_chosen(row), ds.get_rejected(row),
            ds.get_prompt_and_chosen(row), ds.get_prompt_and_rejected(row))


# ---------------------------------------------------------------------------------------------
# Adapters with a train/eval split on disk
# ---------------------------------------------------------------------------------------------

DAHOAS_ROW = {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "response": " Hello.",
              "chosen": " Hello.", "rejected": " Go away."}
DAHOAS_TEXTS = ("\n\nHuman: Hi there\n\nAssistant:", " Hello.", " Go away.",
                "\n\nHuman: Hi there\n\nAssistant: Hello.", "\n\nHuman: Hi there\n\nAssistant: Go away.")


@pytest.mark.parametrize("name,clean", [("Dahoas/rm-static", "Dahoas_rm_static"),
                                        ("Dahoas/full-hh-rlhf", "Dahoas_full_hh_rlhf"),
                                        ("remax-demo/helpful-words", "remax_demo_helpful_words")])
def test_dahoas(tmp_path, name, clean):
    other = dict(DAHOAS_ROW, prompt="\n\nHuman: Bye\n\nAssistant:")
    path = make_dataset(tmp_path, name, [DAHOAS_ROW, other], "test", [other])
    ds = adapter(path)
    assert (ds.dataset_name, ds.dataset_name_clean) == (name, clean)
    assert len(ds.get_train_data()) == 2 and len(ds.get_eval_data()) == 1
    assert texts(ds, ds.get_train_data()[0]) == DAHOAS_TEXTS


def test_yitingxie(tmp_path):
    row = {"prompt": "Human: Q1\nAssistant: A1\nHuman: Q2\n", "chosen": "Assistant: x Assistant: good",
           "rejected": "Assistant: bad"}
    ds = adapter(make_dataset(tmp_path, "yitingxie/rlhf-reward-datasets", [row], "test", [row]))
    assert texts(ds, ds.get_eval_data()[0]) == (
        "Human: Q1\nAssistant: A1\nHuman: Q2\nAssistant:", " good", " bad",
        "Human: Q1\nAssistant: A1\nHuman: Q2\nAssistant: x Assistant: good",
        "Human: Q1\nAssistant: A1\nHuman: Q2\nAssistant: bad")


def test_shp_from_save_to_disk_folder(tmp_path):
    rows = [{"history": "Why?", "human_ref_A": "A says", "human_ref_B": "B says", "labels": 1},
            {"history": "How?", "human_ref_A": "A says", "human_ref_B": "B says", "labels": 0}]
    ds = adapter(make_dataset(tmp_path, "stanfordnlp/SHP", rows, "validation", rows[:1], layout="save_to_disk"))
    train = ds.get_train_data()
    assert len(ds.get_eval_data()) == 1
    assert texts(ds, train[0]) == (" Human: Why? Assistant:", " A says", " B says",
                                   " Human: Why? Assistant: A says", " Human: Why? Assistant: B says")
    assert texts(ds, train[1])[1:] == (" B says", " A says", " Human: How? Assistant: B says",
                                       " Human: How? Assistant: A says")


def test_pvduy(tmp_path, capsys):
    rows = [{"prompt": "USER: hi ASSISTANT:", "label": "hello"}, {"prompt": "", "label": "x"}]
    ds = adapter(make_dataset(tmp_path, "pvduy/sharegpt_alpaca_oa_vicuna_format", rows, "test", rows))
    train = ds.get_train_data()
    assert texts(ds, train[0]) == ("Human: hi Assistant:", " hello", None, "Human: hi Assistant: hello", None)
    assert ds.get_prompt(train[1]) is None and ds.get_prompt_and_chosen(train[1]) is None
    assert "does not include rejected response" in capsys.readouterr().out


MIRACL_ROW = {"query_id": "0", "query": "q?",
              "positive_passages": [{"docid": "p", "text": "pos text", "title": "t"}],
              "negative_passages": [{"docid": "n", "text": "neg text", "title": "t"}]}


@pytest.mark.parametrize("name", ["Cohere/miracl-zh-queries-22-12", "Cohere/miracl-ja-queries-22-12"])
def test_miracl(tmp_path, name):
    no_negative = dict(MIRACL_ROW, negative_passages=[])
    ds = adapter(make_dataset(tmp_path, name, [MIRACL_ROW, no_negative], "dev", [MIRACL_ROW]))
    assert ds.dataset_name == name and len(ds.get_eval_data()) == 1
    train = ds.get_train_data()
    assert texts(ds, train[0]) == (" Human: q? Assistant:", " pos text", " neg text",
                                   " Human: q? Assistant: pos text", " Human: q? Assistant: neg text")
    assert ds.get_prompt_and_rejected(train[1]) is None


def test_lmqg(tmp_path):
    qg = {"question": "q?", "sentence": "s.", "paragraph": "p.", "answer": "a"}
    ds = adapter(make_dataset(tmp_path, "lmqg/qg_jaquad", [qg], "validation", [qg]))
    assert texts(ds, ds.get_eval_data()[0]) == (" Human: q? Assistant:", " s.", None, " Human: q? Assistant: s.", None)
    qag = {"questions": ["q1?", "q2?"], "paragraph": "p.", "answers": ["a"]}
    ds = adapter(make_dataset(tmp_path, "lmqg/qag_jaquad", [qag], "validation", [qag]))
    assert ds.dataset_name_clean == "lmqg_qag_jaquad"
    assert texts(ds, ds.get_train_data()[0]) == (" Human: q1? Assistant:", " p.", None, " Human: q1? Assistant: p.", None)


# ---------------------------------------------------------------------------------------------
# Adapters with only a train split: 9:1 re-split
# ---------------------------------------------------------------------------------------------

def test_train_only_dataset_is_resplit_9_to_1(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": f"B{i}"} for i in range(10)]
    path = make_dataset(tmp_path, "Dahoas/synthetic-instruct-gptj-pairwise", rows)
    ds = adapter(path, seed=7)
    train, eval_ = ds.get_train_data(), ds.get_eval_data()
    prompts = lambda split: [r["prompt"] for r in split]
    assert prompts(train) == [f"Q{i}?" for i in split_indices("9,1", 0, 10, 7)]
    assert prompts(eval_) == [f"Q{i}?" for i in split_indices("9,1", 1, 10, 7)]
    assert len(train) == 9 and len(eval_) == 1 and not set(prompts(train)) & set(prompts(eval_))
    assert texts(ds, eval_[0])[3] == " Human: " + eval_[0]["prompt"] + " Assistant: " + eval_[0]["chosen"]
    assert texts(ds, rows[3]) == (" Human: Q3? Assistant:", " A3", " B3", " Human: Q3? Assistant: A3",
                                  " Human: Q3? Assistant: B3")


def test_webgpt_choice_and_citation_stripping(tmp_path):
    row = {"question": {"dataset": "eli5", "id": "x", "full_text": "Why is the sky blue?"},
           "answer_0": "Because [1] of scattering (2).", "score_0": -1.0,
           "answer_1": "Rayleigh[3] scattering [4][5] does it.", "score_1": 1.0}
    tie = dict(row, score_1=-1.0)
    ds = adapter(make_dataset(tmp_path, "openai/webgpt_comparisons", [row, tie]))
    assert ds.dataset_name_clean == "openai_webgpt_comparisons"
    assert texts(ds, row) == (" Human: Why is the sky blue? Assistant:", " Rayleigh scattering does it.",
                              " Because of scattering.",
                              " Human: Why is the sky blue? Assistant: Rayleigh scattering does it.",
                              " Human: Why is the sky blue? Assistant: Because of scattering.")
    assert ds.get_chosen(tie) == " Because of scattering."       # ties keep answer_0
    assert ds.get_rejected(tie) == " Rayleigh scattering does it."


def test_zhihu(tmp_path):
    row = {"INSTRUCTION": "问题", "RESPONSE": "回答", "SOURCE": "zhihu", "METADATA": "{}"}
    ds = adapter(make_dataset(tmp_path, "wangrui6/Zhihu-KOL", [row]))
    assert texts(ds, ds.get_train_data()[0]) == (" Human: 问题 Assistant:", " 回答", None,
                                                 " Human: 问题 Assistant: 回答", None)


def test_hc3_chinese_jsonl_prefers_all_file(tmp_path):
    path = os.path.join(tmp_path, "Hello-SimpleAI/HC3-Chinese")
    row = {"id": 0, "question": "问?", "human_answers": ["人答"], "chatgpt_answers": ["机答"]}
    write_jsonl(os.path.join(path, "all.jsonl"), [row, row, row])
    write_jsonl(os.path.join(path, "open_qa.jsonl"), [row])      # a per-domain subset of all.jsonl
    ds = adapter(path)
    assert len(ds.get_train_data()) + len(ds.get_eval_data()) == 3
    assert texts(ds, row) == (" Human: 问? Assistant:", " 人答", None, " Human: 问? Assistant: 人答", None)


@pytest.mark.parametrize("name,language,expected", [("mkqa-Chinese", "zh_cn", ("中文问", "中文答")),
                                                    ("mkqa-Japanese", "ja", ("日本問", "日本答"))])
def test_mkqa(tmp_path, name, language, expected):
    def answers(text):
        return [{"type": 5, "entity": "", "text": text, "aliases": []}]
    row = {"example_id": 1, "query": "en q", "queries": {"zh_cn": "中文问", "ja": "日本問", "en": "en q"},
           "answers": {"zh_cn": answers("中文答"), "ja": answers("日本答"), "en": answers("en a")}}
    path = os.path.join(tmp_path, name)
    write_jsonl(os.path.join(path, "mkqa.jsonl"), [row, row])
    ds = adapter(path)
    assert ds.dataset_name_clean == "mkqa"
    q, a = expected
    assert texts(ds, ds.get_train_data()[0]) == (f" Human: {q} Assistant:", f" {a}", None,
                                                 f" Human: {q} Assistant: {a}", None)


# ---------------------------------------------------------------------------------------------
# local/jsonfile
# ---------------------------------------------------------------------------------------------

JSON_ROWS = [{"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."},
             {"prompt": "Bye?", "chosen": "Ok.", "rejected": None}]


def test_local_jsonfile_directory(tmp_path):
    path = str(tmp_path / "local/jsonfile")
    write_local_jsonfile(path, JSON_ROWS, JSON_ROWS[:1])
    ds = adapter(path)
    assert ds.dataset_name_clean == "jsonfile" and len(ds.get_eval_data()) == 1
    train = ds.get_train_data()
    assert texts(ds, train[0]) == (" Hi?", " Yes.", " No.", " Hi? Yes.", " Hi? No.")
    assert texts(ds, train[1]) == (" Bye?", " Ok.", None, " Bye? Ok.", None)


def test_local_jsonfile_flat_directory(tmp_path):
    path = tmp_path / "local/jsonfile"
    write_local_jsonfile(str(path), JSON_ROWS, JSON_ROWS)
    os.replace(path / "data/train.json", path / "train.json")
    os.replace(path / "data/eval.json", path / "eval.json")
    assert len(adapter(str(path)).get_train_data()) == 2


def test_local_jsonfile_literal_reads_parent_of_repo_root(tmp_path, monkeypatch):
    monkeypatch.setattr(raw_datasets, "_REPO_PARENT", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "data" / "train.json")):
        adapter("local/jsonfile")
    write_local_jsonfile(str(tmp_path), JSON_ROWS, JSON_ROWS)
    assert adapter("local/jsonfile").get_prompt(JSON_ROWS[0]) == " Hi?"


def test_local_jsonfile_missing_files_names_paths(tmp_path):
    path = tmp_path / "local/jsonfile"
    path.mkdir(parents=True)
    with pytest.raises(UserError) as err:
        adapter(str(path))
    for tried in (path / "data/train.json", path / "data/eval.json", path / "train.json"):
        assert str(tried) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Selection and errors
# ---------------------------------------------------------------------------------------------

def test_unknown_name_lists_supported():
    with pytest.raises(UserError, match="Dahoas/rm-static.*local/jsonfile"):
        get_raw_dataset("/data/some/other-dataset", None, 1234, 0)


def test_bare_hub_id_never_downloads():
    with pytest.raises(UserError, match="never downloads") as err:
        get_raw_dataset("Dahoas/rm-static", None, 1234, 0)
    assert os.path.abspath("Dahoas/rm-static") in str(err.value)


def test_directory_without_data_files(tmp_path):
    path = tmp_path / "Dahoas/rm-static"
    path.mkdir(parents=True)
    (path / "README.md").write_text("no data")
    with pytest.raises(UserError, match="data files"):
        adapter(str(path))


def test_selection_by_substring_in_order():
    select = raw_datasets._adapter_class
    assert select("/data/Cohere/miracl-ja-queries-22-12") is raw_datasets.CohereMiracljaqueries2212Dataset
    assert select("/x/mkqa-Japanese") is raw_datasets.MkqaJapaneseDataset
    assert select("/x/lmqg/qag_jaquad") is raw_datasets.LmqgQagjaquadDataset
    assert select("/x/remax-demo/helpful-words") is raw_datasets.RemaxDemoHelpfulWordsDataset
    assert len(raw_datasets.SUPPORTED_DATASETS) == 17
