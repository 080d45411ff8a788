"""Tokenizer contract, model building (in the engine's dtype) and HF-format saving on the tiny
checkpoints."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.ds_utils import get_eval_ds_config, get_train_ds_config
from utils.errors import UserError
from utils.model.model_utils import (check_tokenizer_contract, create_critic_model, create_hf_model,
                                     engine_dtype, load_hf_tokenizer, save_hf_format)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tokenizer_contract(family, tiny_opt_path, tiny_llama_path):
    path = tiny_opt_path if family == "opt" else tiny_llama_path
    tok = load_hf_tokenizer(path)
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == "right"
    ids = tok("Human: hi")["input_ids"]
    # OPT prepends its BOS "</s>" (= pad id); Llama prepends "<s>" (id 1).
    assert ids[0] == (2 if family == "opt" else 1)
    assert tok.decode(tok.encode(" ")[-1:]).strip() == ""


def test_tokenizer_reads_local_files_without_hub_name(tiny_opt_path, tmp_path):
    # The original built the tokenizer from config.json's hub name; a local-only dir must work.
    tok = load_hf_tokenizer(tiny_opt_path)
    assert len(tok) == 512
    with pytest.raises(UserError, match="no tokenizer files"):
        load_hf_tokenizer(str(tmp_path))


def test_contract_rejects_small_embedding(tiny_opt_path):
    tok = load_hf_tokenizer(tiny_opt_path)
    model = create_hf_model(AutoModelForCausalLM, tiny_opt_path, tok)
    model.config.vocab_size = 100
    with pytest.raises(UserError, match="embedding has only 100 rows"):
        check_tokenizer_contract(tok, model.config)


def test_create_model_disables_dropout_and_sets_pad(tiny_opt_path):
    tok = load_hf_tokenizer(tiny_opt_path)
    model = create_hf_model(AutoModelForCausalLM, tiny_opt_path, tok, disable_dropout=True)
    assert model.config.dropout == 0.0
    assert model.config.pad_token_id == model.config.eos_token_id == 2
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tok)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_save_hf_format_reloads_with_plain_transformers(family, tiny_opt_path, tiny_llama_path,
                                                        tmp_path):
    path = tiny_opt_path if family == "opt" else tiny_llama_path
    tok = load_hf_tokenizer(path)
    model = create_hf_model(AutoModelForCausalLM, path, tok).eval()
    with torch.no_grad():
        model.model.norm.weight.add_(0.5) if family == "llama" else \
            model.model.decoder.final_layer_norm.weight.add_(0.5)
    out = save_hf_format(model, tok, str(tmp_path / "saved"), rank=0)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("Human: tell me about the moon? Assistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- load precision

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_engine_dtype_follows_the_config():
    assert engine_dtype(None) == torch.float32
    for builder in (get_train_ds_config, get_eval_ds_config):
        assert engine_dtype(builder(False, precision="fp32")) == torch.float32
        assert engine_dtype(builder(False, precision="bf16")) == torch.bfloat16
        assert engine_dtype(builder(False, precision="fp16")) == torch.float16
    assert engine_dtype({"bfloat16": {"enabled": True}}) == torch.bfloat16   # DeepSpeed's alias
    assert engine_dtype({"fp16": {"enabled": "auto"}}) == torch.float32


@pytest.fixture(scope="module")
def checkpoints(tiny_opt_path, tiny_llama_path, tmp_path_factory):
    """{(family, "fp32" | "bf16"): directory}: the tiny checkpoints and bf16 copies of them."""
    from transformers import AutoTokenizer

    found = {}
    for family, path in (("opt", tiny_opt_path), ("llama", tiny_llama_path)):
        found[(family, "fp32")] = path
        half = str(tmp_path_factory.mktemp("bf16") / family)
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(half)
        AutoTokenizer.from_pretrained(path).save_pretrained(half)
        found[(family, "bf16")] = half
    return found


def old_fp32_load_then_deepspeed_cast(path, tokenizer, precision):
    """HEAD's create_hf_model (fp32 from_pretrained, whatever the engine) followed by what a
    DeepSpeed engine of `precision` does to it at initialize (engine.py
    _cast_module_mixed_precision: parameters to bf16/fp16, buffers kept; fp32: nothing)."""
    from transformers import AutoConfig

    from utils.model.model_utils import resize_embeddings

    model = AutoModelForCausalLM.from_pretrained(path, config=AutoConfig.from_pretrained(path),
                                                 dtype=torch.float32)
    resize_embeddings(model, tokenizer)
    if precision in HALF:
        for param in model.parameters():
            param.data = param.data.to(HALF[precision])
    return model


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("checkpoint", ["fp32", "bf16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_load_in_engine_dtype_gives_the_old_fp32_load_then_cast(family, checkpoint, precision,
                                                                checkpoints):
    path = checkpoints[(family, checkpoint)]
    tokenizer = load_hf_tokenizer(path)
    config = get_train_ds_config(False, stage=2, precision=precision)
    model = create_hf_model(AutoModelForCausalLM, path, tokenizer, config)
    old = old_fp32_load_then_deepspeed_cast(path, tokenizer, precision)
    want = HALF.get(precision, torch.float32)
    assert {p.dtype for p in model.parameters()} == {want}        # never an fp32 copy of a half model
    new_state, old_state = dict(model.named_parameters()), dict(old.named_parameters())
    assert new_state.keys() == old_state.keys()
    for name, param in new_state.items():
        assert param.dtype == old_state[name].dtype and torch.equal(param, old_state[name]), name
    new_buffers, old_buffers = dict(model.named_buffers()), dict(old.named_buffers())
    assert new_buffers.keys() == old_buffers.keys()
    for name, buf in new_buffers.items():
        assert buf.dtype == old_buffers[name].dtype and torch.equal(buf, old_buffers[name]), name


def test_rlhf_training_builds_in_the_engine_dtype_not_config_json(checkpoints):
    path = checkpoints[("opt", "bf16")]                 # config.json says bfloat16
    tokenizer = load_hf_tokenizer(path)
    fp32 = create_hf_model(AutoModelForCausalLM, path, tokenizer,
                           get_eval_ds_config(False, precision="fp32"), rlhf_training=True)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}   # DeepSpeed would not cast it
    bf16 = create_hf_model(AutoModelForCausalLM, path, tokenizer,
                           get_eval_ds_config(False, precision="bf16"), rlhf_training=True)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def reward_dirs(tiny_llama_path, tmp_path_factory):
    """{"fp32" | "bf16": a reward-model directory in our layout} of the tiny Llama."""
    from transformers import AutoModel

    from utils.model.model_utils import save_reward_model
    from utils.model.reward_model import RewardModel

    tokenizer = load_hf_tokenizer(tiny_llama_path)
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_pretrained(tiny_llama_path), tokenizer.pad_token_id)
    with torch.no_grad():
        model.v_head.weight.normal_()
    dirs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = str(tmp_path_factory.mktemp("reward") / name)
        save_reward_model(model.to(dtype), tokenizer, out, 0, rank=0)
        dirs[name] = out
    return dirs


@pytest.mark.parametrize("checkpoint", ["fp32", "bf16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reward_model_loads_lazily_in_the_engine_dtype(checkpoint, precision, reward_dirs,
                                                       monkeypatch):
    """Stage 3's reward model: every tensor read once, one at a time, and converted as an fp32
    load then DeepSpeed's cast would; the model in the engine's dtype from the start."""
    from utils.model import reward_model

    path = reward_dirs[checkpoint]
    expected, _ = reward_model.read_reward_checkpoint(path)
    reads = []
    real_getitem = reward_model.LazyStateDict.__getitem__
    monkeypatch.setattr(reward_model.LazyStateDict, "__getitem__",
                        lambda self, key: reads.append(key) or real_getitem(self, key))
    tokenizer = load_hf_tokenizer(path)
    model = create_critic_model(path, tokenizer, get_eval_ds_config(False, precision=precision),
                                rlhf_training=True)
    assert sorted(reads) == sorted(expected)                  # each tensor read exactly once
    want = HALF.get(precision, torch.float32)
    for name, param in model.named_parameters():
        assert param.dtype == want, name
        assert torch.equal(param, expected[name].float().to(want)), name
    ids = torch.tensor([[1, 5, 6, 7, 2, 2]])
    assert model.forward_value(ids, return_value_only=True).dtype == torch.float32


def test_a_resize_keeps_the_checkpoint_rows_exactly_and_added_rows_within_a_bf16_step(
        odd_vocab_opt_path):
    """The rows a resize adds (8·⌈513/8⌉ = 520) are initialised from the mean of the rows it has:
    from the bf16 rows now, from the fp32 rows before, so they may differ by one bf16 step of
    that mean (about 1e-5 here); every row of the checkpoint is the old path's exactly."""
    path = odd_vocab_opt_path
    tokenizer = load_hf_tokenizer(path)
    torch.manual_seed(5)
    new = create_hf_model(AutoModelForCausalLM, path, tokenizer,
                          get_train_ds_config(False, precision="bf16"))
    torch.manual_seed(5)
    old = old_fp32_load_then_deepspeed_cast(path, tokenizer, "bf16")
    rows, old_rows = new.get_input_embeddings().weight, old.get_input_embeddings().weight
    assert rows.shape == old_rows.shape == (520, 64) and rows.dtype == old_rows.dtype
    assert torch.equal(rows[:513], old_rows[:513])
    torch.testing.assert_close(rows[513:], old_rows[513:], rtol=0, atol=1e-5)
