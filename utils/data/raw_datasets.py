"""One adapter per supported dataset name, reading local copies only.

An adapter turns a raw row into the texts the three phases use:
    prompt                " Human: <question> Assistant:"
    chosen / rejected     " <answer>"                     (responses start with a space)
    prompt_and_chosen     " Human: <question> Assistant: <answer>"
Dahoas datasets already hold "\n\nHuman: ... \n\nAssistant:" prompts and are passed through.

Nothing here reaches the network. A dataset is a local directory whose path contains the hub id
(e.g. `/data/Dahoas/rm-static`) and holds what the hub serves: parquet or json(l) files named by
split (`data/train-00000-of-00001.parquet`, `test-*.parquet`, `train.jsonl`, ...), or a
`datasets.save_to_disk` folder.

Rows: an adapter method returns the text, or None when the row has no such text by design (no
rejected answer, a nullable field); the phase is then built without the row, as the original did.
A row it cannot read (a missing column, a null or non-string text) raises BadRow; the data
pipeline skips and counts those rows (an error with --strict_data).
"""
import glob
import json
import os
import re

import datasets

from utils.data.splits import split_indices
from utils.errors import UserError

_SPLIT_NAMES = ("train", "test", "validation", "dev", "eval")
_PARQUET = (".parquet",)
_JSON = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_REPO_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# ----------------------------------------------------------------------------------------------
# Local loading
# ----------------------------------------------------------------------------------------------

def _not_found(path, what):
    return UserError(
        f"{path}: {what} not found (tried {os.path.abspath(path)!r}). This implementation never "
        f"downloads: pass a local copy of the hub dataset, e.g. --data_path /data/{path.strip('/')} "
        f"holding its files (data/train-00000-of-00001.parquet, test-*.parquet, train.jsonl, ...) "
        f"or a datasets.save_to_disk folder.")


def _is_saved_to_disk(path):
    return any(os.path.exists(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


def _saved_splits(path):
    """Split names of a save_to_disk folder (a single Dataset is "train")."""
    index = os.path.join(path, "dataset_dict.json")
    if not os.path.exists(index):
        return ["train"]
    try:
        with open(index) as f:
            return list(json.load(f)["splits"])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{index}: unreadable ({err})") from None


def _split_of(file):
    """Split named by the file ("train-00000-of-00001.parquet", "test.jsonl") or its folder ("train/0000.parquet")."""
    for name in (os.path.basename(file), os.path.basename(os.path.dirname(file))):
        prefix = re.split(r"[-.]", name, maxsplit=1)[0]
        if prefix in _SPLIT_NAMES:
            return prefix
    return None


def find_split_files(path):
    """{split: [files]} of the parquet (preferred) or json data files under the directory `path`."""
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and not any(part.startswith(".") for part in os.path.relpath(f, path).split(os.sep)))
    data = [f for f in files if f.endswith(_PARQUET)] or [f for f in files if f.endswith(_JSON)]
    by_split = {}
    for f in data:
        split = _split_of(f)
        if split is not None:
            by_split.setdefault(split, []).append(f)
    if not by_split and data:
        # Single-split datasets without split names (mkqa's mkqa.jsonl.gz, HC3's all.jsonl next to
        # per-domain files): everything is "train"; "all.*" alone when present.
        all_files = [f for f in data if os.path.basename(f).split(".")[0] == "all"]
        by_split["train"] = all_files or data
    return by_split


def load_local_dataset(path):
    """Load a local dataset directory into a DatasetDict (never the network)."""
    if not os.path.isdir(path):
        raise _not_found(path, "local directory")
    if _is_saved_to_disk(path):
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    data_files = find_split_files(path)
    if not data_files:
        raise _not_found(path, "parquet/json data files")
    builder = "parquet" if next(iter(data_files.values()))[0].endswith(_PARQUET) else "json"
    return datasets.load_dataset(builder, data_files=data_files)


def _jsonfile_paths(path):
    """(train, eval) json files of `local/jsonfile`, or FileNotFoundError naming every path tried.

    An existing directory is read as <dir>/data/{train,eval}.json, else <dir>/{train,eval}.json.
    The literal "local/jsonfile" keeps the original's location, the parent of the repo root
    (inherited from DS-Chat's deeper layout; kept for compatibility).
    """
    if os.path.isdir(path):
        candidates = [os.path.join(path, "data"), path]
    else:
        candidates = [os.path.join(_REPO_PARENT, "data")]
    tried = []
    for folder in candidates:
        pair = (os.path.join(folder, "train.json"), os.path.join(folder, "eval.json"))
        if all(os.path.isfile(f) for f in pair):
            return pair
        tried += pair
    raise UserError(f"local/jsonfile dataset {path!r}: need train.json and eval.json; tried {tried}")


def local_data_files(dataset_name):
    """Every file `get_raw_dataset(dataset_name, ...)` reads (for cache keys); raises like loading does."""
    if _adapter_class(dataset_name) is LocalJsonFileDataset:
        return list(_jsonfile_paths(dataset_name))
    if not os.path.isdir(dataset_name):
        raise _not_found(dataset_name, "local directory")
    if _is_saved_to_disk(dataset_name):
        return sorted(f for f in glob.glob(os.path.join(dataset_name, "**", "*"), recursive=True) if os.path.isfile(f))
    files = [f for split_files in find_split_files(dataset_name).values() for f in split_files]
    if not files:
        raise _not_found(dataset_name, "parquet/json data files")
    return sorted(files)


def check_dataset_path(path, flag="--data_path"):
    """UserError unless `path` names a supported dataset whose local files we can read and which
    has the splits its adapter uses. Reads file names only (no data), so every rank can run it
    before anything is built."""
    try:
        adapter = _adapter_class(path)
        if adapter is LocalJsonFileDataset:
            _jsonfile_paths(path)
            return
        if not os.path.isdir(path):
            raise _not_found(path, "local directory")
        splits = _saved_splits(path) if _is_saved_to_disk(path) else find_split_files(path)
        if not splits:
            raise _not_found(path, "parquet/json data files")
        needed = ["train"] + ([adapter.eval_split] if adapter.eval_split else [])
        missing = [split for split in needed if split not in splits]
        if missing:
            raise UserError(f"{path}: no {' or '.join(map(repr, missing))} split, which the "
                            f"{adapter.dataset_name} adapter reads; found {sorted(splits)}")
    except UserError as err:
        raise UserError(f"{flag} {err}") from None


# ----------------------------------------------------------------------------------------------
# Reading fields
# ----------------------------------------------------------------------------------------------

class BadRow(Exception):
    """A row an adapter cannot read: a missing column, or a null / non-string text."""


def _field_name(keys):
    name = str(keys[0])
    for key in keys[1:]:
        name += f"[{key}]" if isinstance(key, int) else f".{key}"
    return name


def field(row, *keys, optional=False):
    """The text at row[k1][k2]...; BadRow if it is missing, null or not a string.
    optional: a missing or null value is None (the row has no such text), not a bad row."""
    value = row
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            if optional:
                return None
            raise BadRow(f"no {_field_name(keys)}") from None
    if value is None:
        if optional:
            return None
        raise BadRow(f"{_field_name(keys)} is null")
    if not isinstance(value, str):
        raise BadRow(f"{_field_name(keys)} is {type(value).__name__}, not a string")
    return value


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------

def human(question):
    return " Human: " + question + " Assistant:"


def human_answer(question, answer):
    return " Human: " + question + " Assistant: " + answer


class PromptRawDataset:
    """Base adapter: loading, train/eval splits, and the row -> text methods subclasses define."""
    dataset_name = None        # the hub id (the substring get_raw_dataset matches)
    dataset_name_clean = None
    eval_split = "test"        # None: only a train split, re-split 9:1 (split name "train_eval")

    def __init__(self, output_path, seed, local_rank, dataset_name):
        self.output_path = output_path
        self.seed = seed
        self.local_rank = local_rank
        self.data_path = dataset_name   # the local path given by the user
        self._warned = False
        self.raw_datasets = self.load()

    def load(self):
        return load_local_dataset(self.data_path)

    def _split(self, name):
        if name not in self.raw_datasets:
            raise UserError(f"{self.data_path}: no {name!r} split; found {sorted(self.raw_datasets)}")
        return self.raw_datasets[name]

    def _train_eval_ids(self, part):
        # The same index machinery as the phase split.
        return split_indices("9,1", part, len(self._split("train")), self.seed)

    def split_rows(self, which):
        """(rows, split name, ids of those rows in that split or None for all) of "train" or "eval"."""
        if self.eval_split is None:  # only a train split on disk: re-split 9:1
            ids = self._train_eval_ids(0 if which == "train" else 1)
            return self._split("train").select(ids), "train", ids
        split = self.eval_split if which == "eval" else "train"
        return self._split(split), split, None

    def get_train_data(self):
        return self.split_rows("train")[0]

    def get_eval_data(self):
        return self.split_rows("eval")[0]

    def split_files(self, split):
        """The data files of `split`, in the order their rows were loaded ([] for save_to_disk)."""
        if _is_saved_to_disk(self.data_path):
            return []
        return find_split_files(self.data_path).get(split, [])

    def row_location(self, split, row_id):
        """Where row `row_id` of `split` is: "<file> row <n>" (n counted in that file)."""
        files = self.split_files(split)
        if len(files) == 1:
            return f"{files[0]} row {row_id}"
        if files and all(f.endswith(_PARQUET) for f in files):
            import pyarrow.parquet as pq

            start = 0
            for f in files:
                rows = pq.ParquetFile(f).metadata.num_rows
                if row_id < start + rows:
                    return f"{f} row {row_id - start}"
                start += rows
        return f"{self.data_path} split {split!r} row {row_id}"

    def _no_rejected(self):
        # The original printed this on every call (once per row); once per adapter is enough.
        if not self._warned:
            print(f"Warning: dataset {self.dataset_name} does not include rejected response.")
            self._warned = True
        return None

    def get_prompt(self, row):
        raise NotImplementedError

    def get_chosen(self, row):
        raise NotImplementedError

    def get_rejected(self, row):
        raise NotImplementedError

    def get_prompt_and_chosen(self, row):
        raise NotImplementedError

    def get_prompt_and_rejected(self, row):
        raise NotImplementedError


class DahoasRmStaticDataset(PromptRawDataset):
    """Fields prompt/chosen/rejected already in the " Human: ... Assistant:" format."""
    dataset_name = "Dahoas/rm-static"
    dataset_name_clean = "Dahoas_rm_static"

    def get_prompt(self, row):
        return field(row, "prompt")

    def get_chosen(self, row):
        return field(row, "chosen")

    def get_rejected(self, row):
        return field(row, "rejected")

    def get_prompt_and_chosen(self, row):
        return field(row, "prompt") + field(row, "chosen")

    def get_prompt_and_rejected(self, row):
        return field(row, "prompt") + field(row, "rejected")


class DahoasFullhhrlhfDataset(DahoasRmStaticDataset):
    dataset_name = "Dahoas/full-hh-rlhf"
    dataset_name_clean = "Dahoas_full_hh_rlhf"


class RemaxDemoHelpfulWordsDataset(DahoasRmStaticDataset):
    """The CPU demo's synthetic preference set (utils/data/synthetic.py), rm-static's schema."""
    dataset_name = "remax-demo/helpful-words"
    dataset_name_clean = "remax_demo_helpful_words"


class QuestionAnswerDataset(PromptRawDataset):
    """prompt = H(question), chosen = " " + answer, rejected = " " + negative (None when absent).

    Subclasses define question(row), answer(row) and, if they have one, negative(row), reading
    texts with `field` (a null question is a bad row: skipped and counted, as the original
    skipped it in the adapters that checked for it; the others raised).
    """
    has_rejected = True

    def question(self, row):
        raise NotImplementedError

    def answer(self, row):
        raise NotImplementedError

    def negative(self, row):
        raise NotImplementedError

    def get_prompt(self, row):
        return human(self.question(row))

    def get_chosen(self, row):
        answer = self.answer(row)
        return None if answer is None else " " + answer

    def get_rejected(self, row):
        if not self.has_rejected:
            return self._no_rejected()
        negative = self.negative(row)
        return None if negative is None else " " + negative

    def get_prompt_and_chosen(self, row):
        answer = self.answer(row)
        return None if answer is None else human_answer(self.question(row), answer)

    def get_prompt_and_rejected(self, row):
        if not self.has_rejected:
            return self._no_rejected()
        negative = self.negative(row)
        return None if negative is None else human_answer(self.question(row), negative)


class DahoasSyntheticinstructgptjpairwiseDataset(QuestionAnswerDataset):
    dataset_name = "Dahoas/synthetic-instruct-gptj-pairwise"
    dataset_name_clean = "Dahoas_synthetic_instruct_gptj_pairwise"
    eval_split = None

    def question(self, row):
        return field(row, "prompt")

    def answer(self, row):
        return field(row, "chosen")

    def negative(self, row):
        return field(row, "rejected")


class YitingxieRlhfrewarddatasetsDataset(PromptRawDataset):
    """prompt ends before the final "Assistant:"; responses are what follows the last "Assistant:"."""
    dataset_name = "yitingxie/rlhf-reward-datasets"
    dataset_name_clean = "yitingxie_rlhf_reward_datasets"

    def get_prompt(self, row):
        return field(row, "prompt") + "Assistant:"

    def get_chosen(self, row):
        return field(row, "chosen").split("Assistant:")[-1]

    def get_rejected(self, row):
        return field(row, "rejected").split("Assistant:")[-1]

    def get_prompt_and_chosen(self, row):
        return field(row, "prompt") + field(row, "chosen")

    def get_prompt_and_rejected(self, row):
        return field(row, "prompt") + field(row, "rejected")


def strip_citations(text):
    """Remove webgpt's citation brackets ("[1]", "(2)"): first with their leading space, then bare."""
    text = re.sub(r" [\(\[].*?[\)\]]", "", text)
    return re.sub(r"[\(\[].*?[\)\]]", "", text)


class OpenaiWebgptcomparisonsDataset(QuestionAnswerDataset):
    """chosen = the answer with the higher score (answer_0 on ties), rejected = the other."""
    dataset_name = "openai/webgpt_comparisons"
    dataset_name_clean = "openai_webgpt_comparisons"
    eval_split = None

    def question(self, row):
        return field(row, "question", "full_text")

    def answer(self, row):
        better = "answer_0" if float(row["score_0"]) >= float(row["score_1"]) else "answer_1"
        return strip_citations(field(row, better))

    def negative(self, row):
        worse = "answer_0" if float(row["score_0"]) < float(row["score_1"]) else "answer_1"
        return strip_citations(field(row, worse))


class StanfordnlpSHPDataset(QuestionAnswerDataset):
    """labels == 1 means human_ref_A is preferred."""
    dataset_name = "stanfordnlp/SHP"
    dataset_name_clean = "stanfordnlp_SHP"
    eval_split = "validation"

    def question(self, row):
        return field(row, "history")

    def answer(self, row):
        return field(row, "human_ref_A" if int(row["labels"]) == 1 else "human_ref_B")

    def negative(self, row):
        return field(row, "human_ref_B" if int(row["labels"]) == 1 else "human_ref_A")


class PvduySharegptalpacaoavicunaformatDataset(PromptRawDataset):
    """Vicuna-format prompts ("USER: ... ASSISTANT:") renamed to Human/Assistant; no rejected answers."""
    dataset_name = "pvduy/sharegpt_alpaca_oa_vicuna_format"
    dataset_name_clean = "pvduy_sharegpt_alpaca_oa_vicuna_format"

    def get_prompt(self, row):
        prompt = field(row, "prompt", optional=True)
        if not prompt:  # the original skipped empty prompts
            return None
        return prompt.replace("USER", "Human").replace("ASSISTANT", "Assistant")

    def get_chosen(self, row):
        label = field(row, "label", optional=True)
        return " " + label if label else None

    def get_rejected(self, row):
        return self._no_rejected()

    def get_prompt_and_chosen(self, row):
        prompt, label = self.get_prompt(row), field(row, "label", optional=True)
        if prompt is None or not label:
            return None
        return prompt + " " + label

    def get_prompt_and_rejected(self, row):
        return self._no_rejected()


class Wangrui6ZhihuKOLDataset(QuestionAnswerDataset):
    dataset_name = "wangrui6/Zhihu-KOL"
    dataset_name_clean = "wangrui6_Zhihu_KOL"
    eval_split = None
    has_rejected = False

    def question(self, row):
        return field(row, "INSTRUCTION")

    def answer(self, row):
        return field(row, "RESPONSE")


class CohereMiraclzhqueries2212Dataset(QuestionAnswerDataset):
    """chosen = first positive passage, rejected = first negative passage (None if there is none)."""
    dataset_name = "Cohere/miracl-zh-queries-22-12"
    dataset_name_clean = "Cohere_miracl_zh_queries_22_12"
    eval_split = "dev"

    def question(self, row):
        return field(row, "query")

    def answer(self, row):
        return field(row, "positive_passages", 0, "text")

    def negative(self, row):
        if not row.get("negative_passages"):
            return None  # no negative passage: no pair, as the original
        return field(row, "negative_passages", 0, "text")


class HelloSimpleAIHC3ChineseDataset(QuestionAnswerDataset):
    dataset_name = "Hello-SimpleAI/HC3-Chinese"
    dataset_name_clean = "Hello_SimpleAI_HC3_Chinese"
    eval_split = None
    has_rejected = False

    def question(self, row):
        return field(row, "question")

    def answer(self, row):
        return field(row, "human_answers", 0)


class MkqaChineseDataset(QuestionAnswerDataset):
    """A local copy of the hub's `mkqa` (one train split); queries/answers keyed by language."""
    dataset_name = "mkqa-Chinese"
    dataset_name_clean = "mkqa"
    eval_split = None
    has_rejected = False
    language = "zh_cn"

    def question(self, row):
        return field(row, "queries", self.language)

    def answer(self, row):
        return field(row, "answers", self.language, 0, "text")


class MkqaJapaneseDataset(MkqaChineseDataset):
    dataset_name = "mkqa-Japanese"
    language = "ja"


class CohereMiracljaqueries2212Dataset(CohereMiraclzhqueries2212Dataset):
    dataset_name = "Cohere/miracl-ja-queries-22-12"
    dataset_name_clean = "Cohere_miracl_ja_queries_22_12"


class LmqgQgjaquadDataset(QuestionAnswerDataset):
    dataset_name = "lmqg/qg_jaquad"
    dataset_name_clean = "lmqg_qg_jaquad"
    eval_split = "validation"
    has_rejected = False

    def question(self, row):
        return field(row, "question")

    def answer(self, row):
        return field(row, "sentence")


class LmqgQagjaquadDataset(QuestionAnswerDataset):
    dataset_name = "lmqg/qag_jaquad"
    dataset_name_clean = "lmqg_qag_jaquad"
    eval_split = "validation"
    has_rejected = False

    def question(self, row):
        return field(row, "questions", 0)

    def answer(self, row):
        return field(row, "paragraph")


class LocalJsonFileDataset(PromptRawDataset):
    """train.json / eval.json with nullable fields prompt, chosen, rejected (each gets a leading space)."""
    dataset_name = "local/jsonfile"
    dataset_name_clean = "jsonfile"
    eval_split = "eval"

    def load(self):
        train, eval_ = _jsonfile_paths(self.data_path)
        return datasets.load_dataset("json", data_files={"train": train, "eval": eval_})

    def split_files(self, split):
        return [dict(zip(("train", "eval"), _jsonfile_paths(self.data_path)))[split]]

    @staticmethod
    def _spaced(row, *names):
        texts = [field(row, name, optional=True) for name in names]
        return None if any(t is None for t in texts) else "".join(" " + t for t in texts)

    def get_prompt(self, row):
        return self._spaced(row, "prompt")

    def get_chosen(self, row):
        return self._spaced(row, "chosen")

    def get_rejected(self, row):
        return self._spaced(row, "rejected")

    def get_prompt_and_chosen(self, row):
        return self._spaced(row, "prompt", "chosen")

    def get_prompt_and_rejected(self, row):
        return self._spaced(row, "prompt", "rejected")


# Matched by substring of the given path, first match wins (the original's order).
ADAPTERS = (
    DahoasRmStaticDataset,
    DahoasFullhhrlhfDataset,
    DahoasSyntheticinstructgptjpairwiseDataset,
    YitingxieRlhfrewarddatasetsDataset,
    OpenaiWebgptcomparisonsDataset,
    StanfordnlpSHPDataset,
    PvduySharegptalpacaoavicunaformatDataset,
    Wangrui6ZhihuKOLDataset,
    CohereMiraclzhqueries2212Dataset,
    HelloSimpleAIHC3ChineseDataset,
    MkqaChineseDataset,
    MkqaJapaneseDataset,
    CohereMiracljaqueries2212Dataset,
    LmqgQgjaquadDataset,
    LmqgQagjaquadDataset,
    LocalJsonFileDataset,
    RemaxDemoHelpfulWordsDataset,
)
SUPPORTED_DATASETS = tuple(adapter.dataset_name for adapter in ADAPTERS)


def _adapter_class(dataset_name):
    for adapter in ADAPTERS:
        if adapter.dataset_name in dataset_name:
            return adapter
    raise UserError(f"{dataset_name}: no adapter for this dataset, the path must contain one of "
                    f"{', '.join(SUPPORTED_DATASETS)}")


def get_raw_dataset(dataset_name, output_path, seed, local_rank):
    """The adapter for `dataset_name` (a local path containing a supported name), its data loaded."""
    return _adapter_class(dataset_name)(output_path, seed, local_rank, dataset_name)
