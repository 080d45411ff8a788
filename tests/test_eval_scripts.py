"""prompt_eval.py and rw_eval.py on tiny local models: what they print is what the models compute.

The fast tests call each script's `main(argv)` in-process; the slow ones run the scripts as plain
`python` processes (no launcher, no process group), as users do.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT_EVAL = ROOT / "step1_supervised_finetuning" / "prompt_eval.py"
RW_EVAL = ROOT / "step2_reward_model_finetuning" / "rw_eval.py"
MAX_NEW_TOKENS = 5
NUM_PAD = 1  # OPT


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prompt_eval():
    return load_script(PROMPT_EVAL)


@pytest.fixture(scope="module")
def rw_eval():
    return load_script(RW_EVAL)


def run_python(script, args, cwd):
    """`python script args` without any launcher or distributed environment; returns stdout."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


# ----------------------------------------------------------------------------------- prompt_eval

@pytest.fixture(scope="module")
def finetuned_opt_path(tiny_opt_path, tmp_path_factory):
    """The tiny OPT with perturbed weights: a 'fine-tuned' model whose greedy answers differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_opt_path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    path = str(tmp_path_factory.mktemp("finetuned") / "tiny-opt-ft")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_opt_path).save_pretrained(path)
    return path


def expected_greedy(model_path, tokenizer_path, prompts):
    """Greedy `prompt + answer` texts computed here, independently of the script."""
    from transformers import AutoModelForCausalLM

    from utils.model.model_utils import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert ids.shape[1] > inputs["input_ids"].shape[1]
        texts.append(tokenizer.decode(ids[0], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False))
    return texts


def split_prompt_blocks(stdout, module):
    """[(baseline greedy, finetune greedy, finetune sample)] per prompt, texts stripped."""
    headers = [module.BASELINE_GREEDY_HEADER, module.FINETUNE_GREEDY_HEADER,
               module.FINETUNE_SAMPLE_HEADER]
    blocks = []
    for chunk in stdout.split(module.PROMPT_END)[:-1]:
        chunk = chunk[chunk.index(headers[0]):]
        parts = re.split("|".join(re.escape(h) for h in headers), chunk)
        assert parts[0] == "" and len(parts) == 4, chunk
        blocks.append(tuple(p.strip() for p in parts[1:]))
    return blocks


def check_prompt_eval_output(stdout, module, language, baseline_path, finetuned_path):
    prompts = module.PROMPTS[language]
    for header in (module.BASELINE_GREEDY_HEADER, module.FINETUNE_GREEDY_HEADER,
                   module.FINETUNE_SAMPLE_HEADER, module.PROMPT_END):
        assert stdout.count(header) == len(prompts), header
    blocks = split_prompt_blocks(stdout, module)
    baseline = expected_greedy(baseline_path, baseline_path, prompts)
    finetuned = expected_greedy(finetuned_path, baseline_path, prompts)
    assert baseline != finetuned, "the test needs models that answer differently"
    for (base_text, ft_text, sample_text), prompt, want_base, want_ft in zip(
            blocks, prompts, baseline, finetuned):
        assert base_text == want_base.strip()
        assert ft_text == want_ft.strip()
        assert prompt in sample_text


def test_prompt_eval_in_process(prompt_eval, tiny_opt_path, finetuned_opt_path, capsys):
    prompt_eval.main(["--model_name_or_path_baseline", tiny_opt_path,
                      "--model_name_or_path_finetune", finetuned_opt_path,
                      "--max_new_tokens", str(MAX_NEW_TOKENS), "--language", "Japanese",
                      "--seed", "1"])
    check_prompt_eval_output(capsys.readouterr().out, prompt_eval, "Japanese", tiny_opt_path,
                             finetuned_opt_path)


def test_prompt_eval_languages_have_six_prompts(prompt_eval):
    assert sorted(prompt_eval.PROMPTS) == ["Chinese", "English", "Japanese"]
    for prompts in prompt_eval.PROMPTS.values():
        assert len(prompts) == 6 and len(set(prompts)) == 6
        assert all(p.startswith("Human: ") and p.endswith(" Assistant:") for p in prompts)


@pytest.mark.slow
def test_prompt_eval_as_a_script(prompt_eval, tiny_opt_path, finetuned_opt_path, tmp_path):
    stdout = run_python(PROMPT_EVAL, ["--model_name_or_path_baseline", tiny_opt_path,
                                      "--model_name_or_path_finetune", finetuned_opt_path,
                                      "--max_new_tokens", MAX_NEW_TOKENS], cwd=tmp_path)
    check_prompt_eval_output(stdout, prompt_eval, "English", tiny_opt_path, finetuned_opt_path)


# ----------------------------------------------------------------------------------- rw_eval

@pytest.fixture(scope="module")
def reward_model_dir(tiny_opt_path, tmp_path_factory):
    """(saved reward model dir, the in-memory model that was saved, its tokenizer)."""
    from utils.model.model_utils import create_critic_model, load_hf_tokenizer, save_reward_model

    tokenizer = load_hf_tokenizer(tiny_opt_path)
    model = create_critic_model(tiny_opt_path, tokenizer, None, NUM_PAD)
    with torch.no_grad():  # a non-trivial head, so that scores differ clearly between answers
        model.v_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path_factory.mktemp("reward") / "rm")
    save_reward_model(model, tokenizer, path, NUM_PAD, rank=0)
    return path, model.eval(), tokenizer


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    from utils.data.synthetic import build_dataset

    return build_dataset(str(tmp_path_factory.mktemp("data")), num_train=60, num_test=50)


def encode(tokenizer, texts, max_seq_len=512):
    batch = tokenizer([t + tokenizer.eos_token for t in texts], max_length=max_seq_len,
                      padding="max_length", truncation=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def printed(stdout, label):
    return [float(v) for v in re.findall(rf"^{re.escape(label)}: (\S+)$", stdout, flags=re.M)]


def check_rw_eval_output(stdout, module, reward_model_dir, data_args, cache_dir, prompt, answer):
    _, model, tokenizer = reward_model_dir
    assert stdout.count(module.EVAL_RESULT_HEADER) == len(module.PAIRS) + 1
    assert stdout.count(module.SCORES_HEADER) == len(module.PAIRS) + 1
    good, bad = printed(stdout, "good_ans score"), printed(stdout, "bad_ans score")
    assert len(good) == len(bad) == len(module.PAIRS)
    with torch.no_grad():
        for (p, good_ans, bad_ans), got_good, got_bad in zip(module.PAIRS, good, bad):
            out = model(**encode(tokenizer, [p + good_ans, p + bad_ans]))
            assert got_good == pytest.approx(out["chosen_mean_scores"].item(), abs=1e-5)
            assert got_bad == pytest.approx(out["rejected_mean_scores"].item(), abs=1e-5)
        assert abs(good[0] - bad[0]) > 1e-3, "both answers got the same score"
        single = model.forward_value(**encode(tokenizer, [prompt + answer]), prompt_length=2)
    assert printed(stdout, "my_ans score") == [pytest.approx(single["chosen_end_scores"].item(), abs=1e-5)]

    from utils.data.data_utils import DataCollatorReward, create_prompt_dataset
    from utils.training import evaluate_reward, make_loader

    _, eval_data = create_prompt_dataset(-1, [data_args], "2,4,4", cache_dir, 2, 1234, tokenizer, 512,
                                         end_of_conversation_token=tokenizer.eos_token)
    assert len(eval_data) > 4
    want = evaluate_reward(model, make_loader(eval_data, 4, DataCollatorReward(), shuffle=False,
                                              distributed=False), torch.device("cpu"), None)
    assert module.HELD_OUT_HEADER in stdout
    assert printed(stdout, "pairs") == [len(eval_data)]
    assert printed(stdout, "acc") == [pytest.approx(want["acc"], abs=1e-9)]
    assert printed(stdout, "chosen mean score") == [pytest.approx(want["chosen_score"], abs=1e-5)]
    assert printed(stdout, "rejected mean score") == [pytest.approx(want["rejected_score"], abs=1e-5)]


PROMPT, ANSWER = "Human: How does a telescope work? Assistant: ", "It gathers light with a lens."


def rw_eval_args(reward_model_dir, preference_data, cache_dir):
    return ["--model_name_or_path", reward_model_dir[0], "--num_padding_at_beginning", str(NUM_PAD),
            "--prompt", PROMPT, "--answer", ANSWER, "--data_path", preference_data,
            "--data_output_path", str(cache_dir), "--batch_size", "4", "--max_batches", "0"]


def test_rw_eval_in_process(rw_eval, reward_model_dir, preference_data, tmp_path, capsys):
    rw_eval.main(rw_eval_args(reward_model_dir, preference_data, tmp_path / "cache"))
    check_rw_eval_output(capsys.readouterr().out, rw_eval, reward_model_dir, preference_data,
                         str(tmp_path / "cache"), PROMPT, ANSWER)


def test_rw_eval_max_batches_limits_the_held_out_pairs(rw_eval, reward_model_dir, preference_data,
                                                       tmp_path, capsys):
    rw_eval.main(["--model_name_or_path", reward_model_dir[0], "--data_path", preference_data,
                  "--data_output_path", str(tmp_path / "cache"), "--batch_size", "2",
                  "--max_batches", "3"])
    stdout = capsys.readouterr().out
    assert printed(stdout, "pairs") == [6]
    assert "my_ans score" not in stdout


def test_rw_eval_prompt_needs_answer(rw_eval, reward_model_dir):
    with pytest.raises(SystemExit):
        rw_eval.parse_args(["--model_name_or_path", reward_model_dir[0], "--prompt", "hi"])


@pytest.mark.slow
def test_rw_eval_as_a_script_without_process_group(rw_eval, reward_model_dir, preference_data,
                                                    tmp_path):
    """rw_eval.py runs as a plain python process (the original crashed without a process group)."""
    stdout = run_python(RW_EVAL, rw_eval_args(reward_model_dir, preference_data, tmp_path / "cache"),
                        cwd=tmp_path)
    check_rw_eval_output(stdout, rw_eval, reward_model_dir, preference_data, str(tmp_path / "cache"),
                         PROMPT, ANSWER)
