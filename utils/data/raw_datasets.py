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
"""
import glob
import os
import re

import datasets

_SPLIT_NAMES = ("train", "test", "validation", "dev", "eval")
_PARQUET = (".parquet",)
_JSON = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_REPO_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# ----------------------------------------------------------------------------------------------
# Local loading
# ----------------------------------------------------------------------------------------------

def _not_found(path, what):
    return FileNotFoundError(
        f"{what} for dataset {path!r} not found (tried {os.path.abspath(path)!r}). This implementation "
        f"never downloads: pass a local copy of the hub dataset, e.g. --data_path /data/{path.strip('/')} "
        f"holding its files (data/train-00000-of-00001.parquet, test-*.parquet, train.jsonl, ...) "
        f"or a datasets.save_to_disk folder.")


def _is_saved_to_disk(path):
    return any(os.path.exists(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


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
        raise _not_found(path, "Local directory")
    if _is_saved_to_disk(path):
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    data_files = find_split_files(path)
    if not data_files:
        raise _not_found(path, "Parquet/json data files")
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
    raise FileNotFoundError(f"local/jsonfile dataset {path!r}: need train.json and eval.json; tried {tried}")


def local_data_files(dataset_name):
    """Every file `get_raw_dataset(dataset_name, ...)` reads (for cache keys); raises like loading does."""
    if _adapter_class(dataset_name) is LocalJsonFileDataset:
        return list(_jsonfile_paths(dataset_name))
    if not os.path.isdir(dataset_name):
        raise _not_found(dataset_name, "Local directory")
    if _is_saved_to_disk(dataset_name):
        return sorted(f for f in glob.glob(os.path.join(dataset_name, "**", "*"), recursive=True) if os.path.isfile(f))
    files = [f for split_files in find_split_files(dataset_name).values() for f in split_files]
    if not files:
        raise _not_found(dataset_name, "Parquet/json data files")
    return sorted(files)


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
            raise KeyError(f"{self.data_path}: no {name!r} split; found {sorted(self.raw_datasets)}")
        return self.raw_datasets[name]

    def _train_eval_part(self, part):
        # Late import: data_utils imports this module. Same index machinery as the phase split.
        from utils.data.data_utils import split_indices
        train = self._split("train")
        return train.select(split_indices("9,1", part, len(train), self.seed))

    def get_train_data(self):
        return self._split("train") if self.eval_split else self._train_eval_part(0)

    def get_eval_data(self):
        return self._split(self.eval_split) if self.eval_split else self._train_eval_part(1)

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
        return row["prompt"]

    def get_chosen(self, row):
        return row["chosen"]

    def get_rejected(self, row):
        return row["rejected"]

    def get_prompt_and_chosen(self, row):
        return row["prompt"] + row["chosen"]

    def get_prompt_and_rejected(self, row):
        return row["prompt"] + row["rejected"]


class DahoasFullhhrlhfDataset(DahoasRmStaticDataset):
    dataset_name = "Dahoas/full-hh-rlhf"
    dataset_name_clean = "Dahoas_full_hh_rlhf"


class RemaxDemoHelpfulWordsDataset(DahoasRmStaticDataset):
    """The CPU demo's synthetic preference set (utils/data/synthetic.py), rm-static's schema."""
    dataset_name = "remax-demo/helpful-words"
    dataset_name_clean = "remax_demo_helpful_words"


class QuestionAnswerDataset(PromptRawDataset):
    """prompt = H(question), chosen = " " + answer, rejected = " " + negative (None when absent).

    Subclasses define question(row), answer(row) and, if they have one, negative(row).
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
        return row["prompt"]

    def answer(self, row):
        return row["chosen"]

    def negative(self, row):
        return row["rejected"]


class YitingxieRlhfrewarddatasetsDataset(PromptRawDataset):
    """prompt ends before the final "Assistant:"; responses are what follows the last "Assistant:"."""
    dataset_name = "yitingxie/rlhf-reward-datasets"
    dataset_name_clean = "yitingxie_rlhf_reward_datasets"

    def get_prompt(self, row):
        return row["prompt"] + "Assistant:"

    def get_chosen(self, row):
        return row["chosen"].split("Assistant:")[-1]

    def get_rejected(self, row):
        return row["rejected"].split("Assistant:")[-1]

    def get_prompt_and_chosen(self, row):
        return row["prompt"] + row["chosen"]

    def get_prompt_and_rejected(self, row):
        return row["prompt"] + row["rejected"]


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
        return row["question"]["full_text"]

    def answer(self, row):
        better = "answer_0" if float(row["score_0"]) >= float(row["score_1"]) else "answer_1"
        return strip_citations(row[better])

    def negative(self, row):
        worse = "answer_0" if float(row["score_0"]) < float(row["score_1"]) else "answer_1"
        return strip_citations(row[worse])


class StanfordnlpSHPDataset(QuestionAnswerDataset):
    """labels == 1 means human_ref_A is preferred."""
    dataset_name = "stanfordnlp/SHP"
    dataset_name_clean = "stanfordnlp_SHP"
    eval_split = "validation"

    def question(self, row):
        return row["history"]

    def answer(self, row):
        return row["human_ref_A"] if int(row["labels"]) == 1 else row["human_ref_B"]

    def negative(self, row):
        return row["human_ref_B"] if int(row["labels"]) == 1 else row["human_ref_A"]


class PvduySharegptalpacaoavicunaformatDataset(PromptRawDataset):
    """Vicuna-format prompts ("USER: ... ASSISTANT:") renamed to Human/Assistant; no rejected answers."""
    dataset_name = "pvduy/sharegpt_alpaca_oa_vicuna_format"
    dataset_name_clean = "pvduy_sharegpt_alpaca_oa_vicuna_format"

    def get_prompt(self, row):
        if not row["prompt"]:
            return None
        return row["prompt"].replace("USER", "Human").replace("ASSISTANT", "Assistant")

    def get_chosen(self, row):
        return " " + row["label"] if row["label"] else None

    def get_rejected(self, row):
        return self._no_rejected()

    def get_prompt_and_chosen(self, row):
        prompt = self.get_prompt(row)
        if prompt is None or not row["label"]:
            return None
        return prompt + " " + row["label"]

    def get_prompt_and_rejected(self, row):
        return self._no_rejected()


class Wangrui6ZhihuKOLDataset(QuestionAnswerDataset):
    dataset_name = "wangrui6/Zhihu-KOL"
    dataset_name_clean = "wangrui6_Zhihu_KOL"
    eval_split = None
    has_rejected = False

    def question(self, row):
        return row["INSTRUCTION"]

    def answer(self, row):
        return row["RESPONSE"]


class CohereMiraclzhqueries2212Dataset(QuestionAnswerDataset):
    """chosen = first positive passage, rejected = first negative passage (None if there is none)."""
    dataset_name = "Cohere/miracl-zh-queries-22-12"
    dataset_name_clean = "Cohere_miracl_zh_queries_22_12"
    eval_split = "dev"

    def question(self, row):
        return row["query"]

    def answer(self, row):
        return row["positive_passages"][0]["text"]

    def negative(self, row):
        passages = row["negative_passages"]
        return passages[0]["text"] if passages else None


class HelloSimpleAIHC3ChineseDataset(QuestionAnswerDataset):
    dataset_name = "Hello-SimpleAI/HC3-Chinese"
    dataset_name_clean = "Hello_SimpleAI_HC3_Chinese"
    eval_split = None
    has_rejected = False

    def question(self, row):
        return row["question"]

    def answer(self, row):
        return row["human_answers"][0]


class MkqaChineseDataset(QuestionAnswerDataset):
    """A local copy of the hub's `mkqa` (one train split); queries/answers keyed by language."""
    dataset_name = "mkqa-Chinese"
    dataset_name_clean = "mkqa"
    eval_split = None
    has_rejected = False
    language = "zh_cn"

    def question(self, row):
        return row["queries"][self.language]

    def answer(self, row):
        return row["answers"][self.language][0]["text"]


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
        return row["question"]

    def answer(self, row):
        return row["sentence"]


class LmqgQagjaquadDataset(QuestionAnswerDataset):
    dataset_name = "lmqg/qag_jaquad"
    dataset_name_clean = "lmqg_qag_jaquad"
    eval_split = "validation"
    has_rejected = False

    def question(self, row):
        return row["questions"][0]

    def answer(self, row):
        return row["paragraph"]


class LocalJsonFileDataset(PromptRawDataset):
    """train.json / eval.json with nullable fields prompt, chosen, rejected (each gets a leading space)."""
    dataset_name = "local/jsonfile"
    dataset_name_clean = "jsonfile"
    eval_split = "eval"

    def load(self):
        train, eval_ = _jsonfile_paths(self.data_path)
        return datasets.load_dataset("json", data_files={"train": train, "eval": eval_})

    @staticmethod
    def _spaced(*texts):
        return None if any(t is None for t in texts) else "".join(" " + t for t in texts)

    def get_prompt(self, row):
        return self._spaced(row.get("prompt"))

    def get_chosen(self, row):
        return self._spaced(row.get("chosen"))

    def get_rejected(self, row):
        return self._spaced(row.get("rejected"))

    def get_prompt_and_chosen(self, row):
        return self._spaced(row.get("prompt"), row.get("chosen"))

    def get_prompt_and_rejected(self, row):
        return self._spaced(row.get("prompt"), row.get("rejected"))


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
    raise RuntimeError(f"We do not have configs for dataset {dataset_name!r}: the path must contain one of "
                       f"{', '.join(SUPPORTED_DATASETS)}")


def get_raw_dataset(dataset_name, output_path, seed, local_rank):
    """The adapter for `dataset_name` (a local path containing a supported name), its data loaded."""
    return _adapter_class(dataset_name)(output_path, seed, local_rank, dataset_name)
