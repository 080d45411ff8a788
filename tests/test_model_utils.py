"""Tokenizer contract, model building and HF-format saving on the tiny checkpoints."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.errors import UserError
from utils.model.model_utils import (check_tokenizer_contract, create_hf_model, load_hf_tokenizer,
                                     save_hf_format)


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
