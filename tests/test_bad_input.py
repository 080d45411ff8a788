"""Bad input ends a run with one `error:` line naming the flag, file or row, exit code 2 on every
rank, no traceback and no model written; the ZeRO-3 embedding resize; rank-0-only state-dict copies.

Fast tests call the checks directly. The slow ones launch the stages with `deepspeed --num_gpus 2`
(stage 1 ZeRO 3 with an odd vocabulary on one rank). Cases whose check the stage's main.py must
call (`run_main`, `arguments.check_inputs`, ...) are expected to fail until that wiring is in.
"""
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stage_runner
from utils import arguments
from utils.data.data_utils import create_prompt_dataset
from utils.data.splits import split_indices
from utils.data.raw_datasets import check_dataset_path
from utils.errors import EXIT_CODE, UserError, run_main
from utils.model import model_utils
from utils.model.model_utils import (check_model_dir, check_same_tokenizer, gather_state_dict,
                                     load_hf_tokenizer, tokenizers_match)
from utils.model.reward_model import RewardModel, check_reward_model_dir, save_reward_checkpoint

SEED = 1234


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the `datasets` arrow cache out of the home directory."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def exits_with_one_line(capsys, call, *args):
    """Run `call(*args)` under run_main; return the one stderr line it printed (exit code 2 checked)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(call, *args)
    assert exit_info.value.code == EXIT_CODE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------- run_main

def test_run_main_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def bad():
        raise UserError("--data_split '2,4': expected\nthree")

    assert exits_with_one_line(capsys, bad) == "error: --data_split '2,4': expected | three"


def test_run_main_other_ranks_exit_silently(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")

    def bad():
        raise UserError("bad flag")

    with pytest.raises(SystemExit) as exit_info:
        run_main(bad)
    assert exit_info.value.code == EXIT_CODE
    assert capsys.readouterr().err == ""


def test_run_main_keeps_bugs_and_converts_hub_repo_id_errors(capsys, monkeypatch):
    from huggingface_hub.errors import HFValidationError

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)
    assert run_main(lambda x: x + 1, 1) == 2

    def hub():
        raise HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/x'")

    assert "nothing is downloaded" in exits_with_one_line(capsys, hub)


# ----------------------------------------------------------------------------------- flag checks

def stage_parser():
    parser = arguments.new_parser("test stage")
    arguments.add_data_args(parser, sft_only=True)
    parser.add_argument("--model_name_or_path", type=str, required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    arguments.add_runtime_args(parser)
    arguments.add_zero_args(parser)
    arguments.add_lora_args(parser)
    return parser


@pytest.mark.parametrize("argv,needle", [
    ([], "required: --model_name_or_path"),
    (["--data_split", "2,4"], "--data_split '2,4': expected exactly three"),
    (["--data_split", "2,x,4"], "--data_split '2,x,4'"),
    (["--data_split", "2,-1,4"], "non-negative"),
    (["--data_split", "0,0,0"], "sum to 0"),
    (["--data_split", "5,0,5"], "phase 2 (this stage) no data"),
    (["--only_optimize_lora"], "--only_optimize_lora needs --lora_dim > 0"),
    (["--lora_dim", "-1"], "--lora_dim must be >= 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
    (["--offload"], "--offload needs --zero_stage 1, 2 or 3: at ZeRO 0"),
])
def test_finish_one_line_per_bad_flag(capsys, monkeypatch, argv, needle):
    monkeypatch.delenv("RANK", raising=False)
    model = [] if not argv else ["--model_name_or_path", "m"]
    line = exits_with_one_line(capsys, arguments.finish, stage_parser(), model + ["--output_dir", "o"] + argv, 2)
    assert needle in line


def test_finish_accepts_good_flags_and_sft_only_data_for_phase_1():
    args = arguments.finish(stage_parser(), ["--model_name_or_path", "m", "--output_dir", "o",
                                             "--data_split", "0,5,5", "--sft_only_data_path", "d",
                                             "--lora_dim", "4", "--only_optimize_lora"], 1)
    assert args.data_split == "0,5,5" and args.strict_data is False
    assert arguments.parse_data_split(" 2, 4 ,4") == [2.0, 4.0, 4.0]


def rollout(**overrides):
    values = dict(per_device_generation_batch_size=4, per_device_training_batch_size=4,
                  num_samples_per_prompt=1, unsupervised_dataset_name=None)
    return SimpleNamespace(**{**values, **overrides})


def test_rollout_batches_must_divide():
    arguments.check_rollout_batches(rollout(num_samples_per_prompt=3, per_device_training_batch_size=6))
    with pytest.raises(UserError, match="--per_device_training_batch_size 3 does not divide the 4"):
        arguments.check_rollout_batches(rollout(per_device_training_batch_size=3))
    with pytest.raises(UserError, match="pretraining mix pairs each of the 2 experience"):
        arguments.check_rollout_batches(rollout(num_samples_per_prompt=2, unsupervised_dataset_name="c"))
    arguments.check_rollout_batches(rollout(unsupervised_dataset_name="c", per_device_training_batch_size=2))


def test_frozen_model_stages():
    ok = SimpleNamespace(reference_zero_stage=2, reward_zero_stage=3, offload_reference_model=False,
                         offload_reward_model=True)
    arguments.check_frozen_model_stages(ok)   # 2 falls back to 0, as the original
    with pytest.raises(UserError, match="--reward_zero_stage 5"):
        arguments.check_frozen_model_stages(SimpleNamespace(**{**vars(ok), "reward_zero_stage": 5}))
    with pytest.raises(UserError, match="--offload_reference_model needs --reference_zero_stage 3"):
        arguments.check_frozen_model_stages(SimpleNamespace(**{**vars(ok), "offload_reference_model": True}))


# ----------------------------------------------------------------------------------- model directories

def test_model_dir_checks(tmp_path, tiny_opt_path):
    check_model_dir(tiny_opt_path)
    with pytest.raises(UserError, match=r"--model_name_or_path .*/none: no such directory"):
        check_model_dir(str(tmp_path / "none"))
    with pytest.raises(UserError, match="is empty"):
        check_model_dir("", "--actor_model_name_or_path")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="a file, not a model directory"):
        check_model_dir(str(tmp_path / "file"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"no config.json \(it holds notes.txt\)"):
        check_model_dir(str(tmp_path / "d"))
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="config.json but no weights"):
        check_model_dir(str(tmp_path / "d"))
    (tmp_path / "d" / "model.safetensors").write_text("")
    with pytest.raises(UserError, match="no tokenizer files"):
        check_model_dir(str(tmp_path / "d"))


def tiny_reward_dir(path, backbone_path):
    """A stage-2-layout directory: a random head on the checkpoint's backbone, its tokenizer."""
    from transformers import AutoModel

    tokenizer = load_hf_tokenizer(backbone_path)
    model = RewardModel(AutoModel.from_pretrained(backbone_path), tokenizer.pad_token_id)
    save_reward_checkpoint(str(path), model.state_dict(), model.config, tokenizer.pad_token_id, 0, tokenizer)
    return str(path)


def test_reward_dir_holding_an_sft_model_says_what_it_is(tiny_opt_path, tmp_path):
    with pytest.raises(UserError) as err:
        check_reward_model_dir(tiny_opt_path)
    message = str(err.value)
    assert message.startswith(f"--reward_model_name_or_path {tiny_opt_path}: a causal-LM checkpoint "
                              f"(OPTForCausalLM: config.json + model.safetensors)")
    assert "no value_head.safetensors / reward_model.json" in message and "\n" not in message


def test_reward_dir_layouts(tiny_opt_path, tmp_path):
    ours = tiny_reward_dir(tmp_path / "ours", tiny_opt_path)
    check_reward_model_dir(ours)
    os.remove(os.path.join(ours, "value_head.safetensors"))
    with pytest.raises(UserError, match="incomplete reward-model directory, value_head.safetensors missing"):
        check_reward_model_dir(ours)
    with pytest.raises(UserError, match="no such directory"):
        check_reward_model_dir(str(tmp_path / "none"), "--critic_model_name_or_path")
    original = tmp_path / "original"
    original.mkdir()
    torch.save({"rwtranrsformer.w": torch.zeros(2), "v_head.weight": torch.zeros(1, 2)},
               original / "pytorch_model.bin")
    check_reward_model_dir(str(original))
    torch.save({"model.decoder.w": torch.zeros(2)}, original / "pytorch_model.bin")  # an original SFT save
    with pytest.raises(UserError, match="pytorch_model.bin is not a reward model"):
        check_reward_model_dir(str(original))


def test_tokenizers_must_match(tiny_opt_path, tiny_llama_path, tmp_path):
    opt = load_hf_tokenizer(tiny_opt_path)
    assert tokenizers_match(opt, load_hf_tokenizer(tiny_opt_path)) is None
    grown = load_hf_tokenizer(tiny_opt_path)
    grown.add_tokens(["<extra>"])
    assert tokenizers_match(opt, grown) == "512 vs 513 tokens"
    check_same_tokenizer({"--actor_model_name_or_path": tiny_opt_path,
                          "--reward_model_name_or_path": tiny_opt_path})
    reward = tiny_reward_dir(tmp_path / "reward", tiny_llama_path)
    with pytest.raises(UserError) as err:
        check_same_tokenizer({"--actor_model_name_or_path": tiny_opt_path,
                              "--reward_model_name_or_path": reward})
    assert str(err.value).startswith(f"--actor_model_name_or_path {tiny_opt_path} and "
                                     f"--reward_model_name_or_path {reward} use different tokenizers (")


# ----------------------------------------------------------------------------------- datasets

def write_rm_static(root, train_rows, test_rows, name="Dahoas/rm-static"):
    path = os.path.join(str(root), name)
    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        if rows is not None:
            pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, "data", f"{split}-00000-of-00001.parquet"))
    return path


def rows(n, tag="", rejected=True):
    return [{"prompt": f"\n\nHuman: question {tag}{i} about the moon?\n\nAssistant:", "chosen": f" Yes {i}.",
             "rejected": f" No {i}." if rejected else None} for i in range(n)]


def test_dataset_path_checks(tmp_path):
    good = write_rm_static(tmp_path / "a", rows(4), rows(2))
    check_dataset_path(good)
    with pytest.raises(UserError, match=r"--data_path /nowhere/Dahoas/rm-static: local directory not found"):
        check_dataset_path("/nowhere/Dahoas/rm-static")
    empty = tmp_path / "b" / "Dahoas" / "rm-static"
    empty.mkdir(parents=True)
    (empty / "README.md").write_text("no data")
    with pytest.raises(UserError, match="parquet/json data files not found"):
        check_dataset_path(str(empty), "--sft_only_data_path")
    no_test = write_rm_static(tmp_path / "c", rows(4), None)
    with pytest.raises(UserError, match=r"no 'test' split, which the Dahoas/rm-static adapter reads; found \['train'\]"):
        check_dataset_path(no_test)
    with pytest.raises(UserError, match="--data_path /data/other: no adapter"):
        check_dataset_path("/data/other")


@pytest.fixture(scope="module")
def opt_tok(tiny_opt_path):
    return load_hf_tokenizer(tiny_opt_path)


def phase_rows(n, phase, data_split="2,4,4"):
    return split_indices(data_split, phase - 1, n, SEED)


def test_bad_rows_are_skipped_counted_and_strict_is_an_error(tmp_path, opt_tok, capsys):
    train = rows(40)
    first, second = phase_rows(40, 1)[:2]          # rows phase 1 reads, in the order it reads them
    train[first]["prompt"] = None
    train[second]["chosen"] = None
    path = write_rm_static(tmp_path, train, rows(10, "t"))
    out = str(tmp_path / "cache")
    data, _ = create_prompt_dataset(0, [path], "2,4,4", out, 1, SEED, opt_tok, 32)
    assert len(data) == len(phase_rows(40, 1)) - 2
    log = capsys.readouterr().out
    assert log.count("[data] warning") == 1
    assert f"skipped 2 of {len(phase_rows(40, 1)) + len(phase_rows(10, 1))} rows" in log
    assert f"(first: {path}/data/train-00000-of-00001.parquet row {first}: prompt is null)" in log
    strict = rf"{path}/data/train-00000-of-00001.parquet row {first}: prompt is null \(--strict_data"
    with pytest.raises(UserError, match=strict):    # a cache hit remembers what it skipped
        create_prompt_dataset(0, [path], "2,4,4", out, 1, SEED, opt_tok, 32, strict_data=True)
    with pytest.raises(UserError, match=strict):    # a fresh build stops at the row
        create_prompt_dataset(0, [path], "2,4,4", str(tmp_path / "fresh"), 1, SEED, opt_tok, 32, strict_data=True)
    assert not os.listdir(tmp_path / "fresh")       # no cache written


def test_missing_column_and_non_string_values(tmp_path, opt_tok):
    from utils.data.data_utils import SkippedRows, adapted_rows
    from utils.data.raw_datasets import DahoasRmStaticDataset

    adapter = DahoasRmStaticDataset.__new__(DahoasRmStaticDataset)   # the row methods only
    skipped = SkippedRows()
    kept = adapted_rows([{"prompt": "p", "chosen": " c"}, {"prompt": 3, "chosen": " c"}, {"chosen": " c"}],
                        [adapter.get_prompt_and_chosen], row_ids=[10, 11, 12], skipped=skipped)
    assert kept == [("p c",)] and skipped.count == 2 and skipped.first == ("train", 11, "prompt is int, not a string")
    skipped = SkippedRows()
    adapted_rows([{"chosen": " c"}], [adapter.get_prompt], skipped=skipped)
    assert skipped.first[2] == "no prompt"
    no_chosen = [{k: v for k, v in row.items() if k != "chosen"} for row in rows(20)]
    path = write_rm_static(tmp_path, no_chosen, no_chosen[:5])
    with pytest.raises(UserError, match=r"leaves phase 1 no train rows .*unreadable rows were skipped \(first: .* no chosen\)"):
        create_prompt_dataset(0, [path], "2,4,4", str(tmp_path / "c"), 1, SEED, opt_tok, 32)


def test_null_question_in_a_qa_dataset_is_skipped_as_the_original(tmp_path, opt_tok, capsys):
    """wangrui6/Zhihu-KOL (train split only, re-split 9:1): the original skipped a null INSTRUCTION;
    we skip and count it, and --strict_data names its row in the file."""
    train = [{"INSTRUCTION": f"问题 {i}", "RESPONSE": f"回答 {i}"} for i in range(30)]
    part = split_indices("9,1", 0, 30, SEED)                      # the re-split's train rows
    bad = part[phase_rows(len(part), 1)[0]]                        # ... that phase 1 reads
    train[bad]["INSTRUCTION"] = None
    path = os.path.join(str(tmp_path), "wangrui6/Zhihu-KOL")
    os.makedirs(os.path.join(path, "data"))
    pq.write_table(pa.Table.from_pylist(train), os.path.join(path, "data", "train-00000-of-00001.parquet"))
    data, _ = create_prompt_dataset(0, [path], "2,4,4", str(tmp_path / "c"), 1, SEED, opt_tok, 64)
    assert len(data) == len(phase_rows(len(part), 1)) - 1
    assert f"row {bad}: INSTRUCTION is null" in capsys.readouterr().out
    with pytest.raises(UserError, match=rf"train-00000-of-00001.parquet row {bad}: INSTRUCTION is null"):
        create_prompt_dataset(0, [path], "2,4,4", str(tmp_path / "s"), 1, SEED, opt_tok, 64, strict_data=True)


def test_empty_split_after_data_split(tmp_path, opt_tok):
    path = write_rm_static(tmp_path, rows(20, rejected=False), rows(5, rejected=False))
    with pytest.raises(UserError, match=r"--data_split 2,4,4 leaves phase 2 no train rows from .*Dahoas/rm-static"):
        create_prompt_dataset(0, [path], "2,4,4", str(tmp_path / "c"), 2, SEED, opt_tok, 32)
    one_eval_row = write_rm_static(tmp_path / "e", rows(20), rows(1))   # "2,4,4" of 1 row: phase 1 gets it
    with pytest.raises(UserError, match="leaves phase 2 no eval rows"):
        create_prompt_dataset(0, [one_eval_row], "2,4,4", str(tmp_path / "c"), 2, SEED, opt_tok, 32)
    train, eval_ = create_prompt_dataset(0, [one_eval_row], "2,4,4", str(tmp_path / "c"), 2, SEED, opt_tok, 32,
                                         required=("train",))
    assert len(train) == len(phase_rows(20, 2)) and len(eval_) == 0


def _strict_two_rank_worker(rank, init_file, tokenizer_path, data_path, out, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        create_prompt_dataset(rank, [data_path], "2,4,4", out, 1, SEED, load_hf_tokenizer(tokenizer_path), 32,
                              strict_data=True)
        message = "no error"
    except UserError as err:
        message = str(err)
    finally:
        torch.distributed.destroy_process_group()
    with open(os.path.join(results, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def test_a_data_error_on_rank_0_reaches_every_rank_without_a_hang(tmp_path, tiny_opt_path):
    """Only rank 0 builds; its error must not leave rank 1 waiting at the barrier."""
    train = rows(40)
    train[phase_rows(40, 1)[0]]["prompt"] = None
    path = write_rm_static(tmp_path / "d", train, rows(10))
    results = tmp_path / "results"
    results.mkdir()
    context = torch.multiprocessing.spawn(
        _strict_two_rank_worker, nprocs=2, join=False,
        args=(str(tmp_path / "init"), tiny_opt_path, path, str(tmp_path / "out"), str(results)))
    deadline = time.time() + 240
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank hung after rank 0's data error")
    messages = [(results / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and "prompt is null (--strict_data)" in messages[0]


# ----------------------------------------------------------------------------------- eval scripts

def load_script(relative):
    import importlib.util

    path = os.path.join(stage_runner.ROOT, relative)
    spec = importlib.util.spec_from_file_location(f"_bad_input_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rw_eval_on_an_sft_directory_is_one_line(capsys, monkeypatch, tiny_opt_path):
    monkeypatch.delenv("RANK", raising=False)
    rw_eval = load_script("step2_reward_model_finetuning/rw_eval.py")
    line = exits_with_one_line(capsys, rw_eval.main, ["--model_name_or_path", tiny_opt_path])
    assert "a causal-LM checkpoint" in line
    line = exits_with_one_line(capsys, rw_eval.main, ["--model_name_or_path", "/nowhere/reward"])
    assert line == "error: --model_name_or_path /nowhere/reward: no such directory (a stage-2 output " \
                   "directory; nothing is downloaded)"
    assert "--data_split" in exits_with_one_line(capsys, rw_eval.main, ["--model_name_or_path", tiny_opt_path,
                                                                       "--data_split", "1,1"])


def test_prompt_eval_on_a_missing_model_is_one_line(capsys, monkeypatch, tiny_opt_path):
    monkeypatch.delenv("RANK", raising=False)
    prompt_eval = load_script("step1_supervised_finetuning/prompt_eval.py")
    line = exits_with_one_line(capsys, prompt_eval.main, ["--model_name_or_path_baseline", tiny_opt_path,
                                                          "--model_name_or_path_finetune", "/nowhere/ft"])
    assert line.startswith("error: --model_name_or_path_finetune /nowhere/ft: no such directory")
    assert "required: --model_name_or_path_baseline" in exits_with_one_line(capsys, prompt_eval.main, [])


# ----------------------------------------------------------------------------------- saving

def test_only_rank_0_copies_the_state_dict(tiny_opt_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_opt_path)
    copies = []
    real_copy = model_utils._cpu_copy
    monkeypatch.setattr(model_utils, "_cpu_copy", lambda t: copies.append(t.shape) or real_copy(t))
    assert gather_state_dict(model, rank=1) is None and copies == []
    state = gather_state_dict(model, rank=0)
    assert len(copies) == len(state) and "lm_head.weight" in state


# ----------------------------------------------------------------------------------- ZeRO 3 resize

ZERO3_RESIZE_SCRIPT = textwrap.dedent("""
    import os, sys, torch, deepspeed
    from transformers import AutoModelForCausalLM
    from utils.ds_utils import get_train_ds_config, set_batch_sizes
    from utils.model import model_utils
    from utils.model.model_utils import create_hf_model, gather_state_dict, load_hf_tokenizer
    from utils.module.lora import LinearLayer_LoRA, apply_lora, lora_merged_state_dict

    path = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = load_hf_tokenizer(path)
    config = set_batch_sizes(get_train_ds_config(False, stage=3), 1, 1, 1)
    model = create_hf_model(AutoModelForCausalLM, path, tokenizer, config)
    embed = model.get_input_embeddings().weight
    assert tuple(embed.shape) == (520, 64) and model.config.vocab_size == 520, embed.shape
    reference = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight
    assert torch.equal(embed.data[:513], reference.data), "the checkpoint's rows were not kept"
    apply_lora(model, 4, "decoder.layers.")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearLayer_LoRA):
                module.lora_left_weight.normal_()   # a non-zero update, so the merge shows
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    embed = engine.module.get_input_embeddings().weight
    assert hasattr(embed, "ds_id") and tuple(embed.ds_shape) == (520, 64)
    ids = torch.tensor([[2, 5, 7, 512]])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    copies = []
    real_copy = model_utils._cpu_copy
    model_utils._cpu_copy = lambda t: copies.append(1) or real_copy(t)
    assert gather_state_dict(engine, rank=1) is None and not copies   # joins the gathers, copies nothing
    state = gather_state_dict(engine, rank=0)
    assert tuple(state["model.decoder.embed_tokens.weight"].shape) == (520, 64) and len(copies) == len(state)
    expected = lora_merged_state_dict(engine.module)      # lora.py's export: the same tensors
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    print("ZERO3_RESIZE_OK")
""")


@pytest.mark.slow
def test_zero3_resize_keeps_rows_and_rank_1_copies_nothing(odd_vocab_opt_path, tmp_path):
    script = tmp_path / "zero3_resize.py"
    script.write_text(ZERO3_RESIZE_SCRIPT)
    env = dict(stage_runner.launcher_env(), PYTHONPATH=stage_runner.ROOT, RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(stage_runner.free_port()))
    result = subprocess.run([sys.executable, str(script), odd_vocab_opt_path], cwd=stage_runner.ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "ZERO3_RESIZE_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_stage1_zero3_with_an_odd_vocabulary_trains_and_saves(odd_vocab_opt_path, preference_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    stage_runner.run_stage(1, stage_runner.sft_args(
        odd_vocab_opt_path, preference_data, out, zero_stage=3,
        extra=["--data_split", "1,4,5", "--num_train_epochs", 1, "--evals_per_epoch", 1]), num_gpus=1)
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.vocab_size == 520 and saved.get_input_embeddings().weight.shape[0] == 520


# ----------------------------------------------------------------------------------- through the launcher

def wired(stage):
    """True once the stage's main.py calls run_main and the input checks (the lead's wiring)."""
    with open(os.path.join(stage_runner.ROOT, stage_runner.STAGES[stage], "main.py")) as f:
        source = f.read()
    return "run_main(main)" in source and "check_inputs(" in source


def needs_wiring(stage):
    return pytest.mark.xfail(not wired(stage), strict=False,
                             reason=f"needs run_main/check_inputs in stage {stage}'s main.py (the lead's wiring)")


def launch(stage, args, num_gpus=2):
    return stage_runner.run_command(stage_runner.stage_command(stage, args, num_gpus))


MODEL_FILES = ("config.json", "model.safetensors", "value_head.safetensors", "pytorch_model.bin")


def assert_one_error_line(returncode, output, out_dir, *needles):
    assert returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-6000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    written = [os.path.join(d, f) for d, _, files in os.walk(out_dir) for f in files if f in MODEL_FILES]
    assert not written, written


def stage1(model, data, out, *extra):
    return stage_runner.sft_args(model, data, out, zero_stage=2, extra=["--num_train_epochs", 1, *extra])


@pytest.fixture(scope="module")
def bad_row_data(tmp_path_factory):
    """rm-static layout whose first phase-1 train row has a null prompt."""
    train = rows(60)
    bad = phase_rows(60, 1, "6,2,2")[0]
    train[bad]["prompt"] = None
    return write_rm_static(tmp_path_factory.mktemp("bad_rows"), train, rows(20)), bad


@pytest.mark.slow
@pytest.mark.parametrize("args,needles", [
    (["--output_dir", "{out}"], ["required: --model_name_or_path"]),
    (["--model_name_or_path", "{model}", "--output_dir", "{out}", "--data_split", "2,4"], ["--data_split '2,4'"]),
    (["--model_name_or_path", "{model}", "--output_dir", "{out}", "--only_optimize_lora"], ["--only_optimize_lora"]),
], ids=["missing-model-flag", "data-split-2-parts", "lora-without-dim"])
def test_stage1_bad_flags_through_the_launcher(args, needles, tiny_opt_path, tmp_path):
    out = str(tmp_path / "out")
    args = [a.format(out=out, model=tiny_opt_path) for a in args]
    assert_one_error_line(*launch(1, args), out, *needles)


@pytest.mark.slow
@needs_wiring(1)
def test_stage1_missing_model_dir_through_the_launcher(preference_data, tmp_path):
    out = str(tmp_path / "out")
    returncode, output = launch(1, stage1(str(tmp_path / "no-model"), preference_data, out))
    assert_one_error_line(returncode, output, out, f"--model_name_or_path {tmp_path / 'no-model'}: no such directory")
    assert "Repo id" not in output


@pytest.mark.slow
@needs_wiring(1)
def test_stage1_dataset_without_files_through_the_launcher(tiny_opt_path, tmp_path):
    data = tmp_path / "data" / "Dahoas" / "rm-static"
    data.mkdir(parents=True)
    (data / "README.md").write_text("nothing here")
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(1, stage1(tiny_opt_path, str(data), out)), out,
                          f"--data_path {data}: parquet/json data files not found")


@pytest.mark.slow
@needs_wiring(1)
def test_stage1_zero_share_for_its_phase_through_the_launcher(tiny_opt_path, preference_data, tmp_path):
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(1, stage1(tiny_opt_path, preference_data, out, "--data_split", "0,5,5")), out,
                          "--data_split 0,5,5 gives phase 1 (this stage) no data")


@pytest.mark.slow
@needs_wiring(1)
def test_stage1_strict_data_names_the_row_through_the_launcher(tiny_opt_path, bad_row_data, tmp_path):
    data, bad = bad_row_data
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(1, stage1(tiny_opt_path, data, out, "--strict_data")), out,
                          f"train-00000-of-00001.parquet row {bad}: prompt is null (--strict_data)")


@pytest.mark.slow
def test_stage1_bad_row_is_skipped_with_one_warning(tiny_opt_path, bad_row_data, tmp_path):
    data, bad = bad_row_data
    out = str(tmp_path / "out")
    returncode, output = launch(1, stage1(tiny_opt_path, data, out))
    assert returncode == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "[data] warning" in line]
    assert len(warnings) == 1 and f"row {bad}: prompt is null" in warnings[0] and "skipped 1 of" in warnings[0]


@pytest.mark.slow
@needs_wiring(2)
def test_stage2_empty_split_through_the_launcher(tiny_opt_path, tmp_path):
    data = write_rm_static(tmp_path / "data", rows(60, rejected=False), rows(20, rejected=False))
    out = str(tmp_path / "out")
    args = stage_runner.reward_args(tiny_opt_path, data, out, zero_stage=2, pad_at_beginning=1)
    assert_one_error_line(*launch(2, args), out, "--data_split 2,6,2 leaves phase 2 no train rows")


def remax(actor, reward, data, out, *extra):
    return stage_runner.remax_args(actor, reward, data, out, 2, 0, 0, 1, extra=list(extra))


@pytest.mark.slow
def test_stage3_frozen_model_stage_through_the_launcher(tiny_opt_path, preference_data, tmp_path):
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(3, remax(tiny_opt_path, tiny_opt_path, preference_data, out,
                                           "--offload_reward_model")), out,
                          "--offload_reward_model needs --reward_zero_stage 3")


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", [
    (["--offload", "--actor_zero_stage", "0"], "--offload needs --actor_zero_stage 1, 2 or 3"),
    (["--offload", "--algo", "ppo"], "--offload with --algo ppo needs --critic_zero_stage 1, 2 or 3"),
], ids=["actor-zero0", "critic-zero0"])
def test_stage3_offload_at_zero0_through_the_launcher(extra, needle, tiny_opt_path, preference_data,
                                                       tmp_path):
    out = str(tmp_path / "out")
    # the later --actor_zero_stage wins over remax()'s 2
    assert_one_error_line(*launch(3, remax(tiny_opt_path, tiny_opt_path, preference_data, out,
                                           *extra)), out, needle)


@pytest.mark.slow
@needs_wiring(3)
def test_stage3_reward_dir_holding_an_sft_model_through_the_launcher(tiny_opt_path, preference_data, tmp_path):
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(3, remax(tiny_opt_path, tiny_opt_path, preference_data, out)), out,
                          f"--reward_model_name_or_path {tiny_opt_path}: a causal-LM checkpoint")


@pytest.mark.slow
@needs_wiring(3)
def test_stage3_tokenizer_mismatch_through_the_launcher(tiny_opt_path, tiny_llama_path, preference_data, tmp_path):
    reward = tiny_reward_dir(tmp_path / "llama-reward", tiny_llama_path)
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(3, remax(tiny_opt_path, reward, preference_data, out)), out,
                          "use different tokenizers", "--actor_model_name_or_path", reward)


@pytest.mark.slow
@needs_wiring(3)
def test_stage3_batches_that_do_not_divide_through_the_launcher(tiny_opt_path, preference_data, tmp_path):
    reward = tiny_reward_dir(tmp_path / "reward", tiny_opt_path)
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(3, remax(tiny_opt_path, reward, preference_data, out,
                                           "--per_device_training_batch_size", 3)), out,
                          "--per_device_training_batch_size 3 does not divide the 4 experience rows")


@pytest.mark.slow
def test_stage3_too_few_prompts_for_the_generation_batches_through_the_launcher(tiny_opt_path, preference_data,
                                                                                 tmp_path):
    reward = tiny_reward_dir(tmp_path / "reward", tiny_opt_path)
    out = str(tmp_path / "out")
    assert_one_error_line(*launch(3, remax(tiny_opt_path, reward, preference_data, out,
                                           "--generation_batches", 1000)), out,
                          "full prompt batches per rank; --generation_batches 1000 needs more prompts")
