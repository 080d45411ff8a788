"""Parameter groups (biases and every norm weight not decayed), optimizer choice, scheduler."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from utils.module.lora import convert_linear_layer_to_lora
from utils.optim import create_lr_scheduler, create_optimizer, get_optimizer_grouped_parameters, optimizer_kind


def tiny_opt():
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16))


def group_names(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in groups]


def test_opt_groups_exempt_biases_and_every_norm():
    model = tiny_opt()
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    assert len(groups) == 2  # no LoRA group without LoRA parameters
    decay, no_decay = group_names(model, groups)
    assert groups[0]["weight_decay"] == 0.1 and "lr" not in groups[0]
    assert groups[1]["weight_decay"] == 0.0
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in decay
    assert "model.decoder.embed_tokens.weight" in decay
    assert "model.decoder.layers.0.self_attn.q_proj.bias" in no_decay
    # The original decayed these (its "LayerNorm.weight" matches none of them).
    for norm in ["model.decoder.layers.0.self_attn_layer_norm.weight", "model.decoder.layers.1.final_layer_norm.weight",
                 "model.decoder.final_layer_norm.weight"]:
        assert norm in no_decay
    assert not any("norm" in n or "bias" in n for n in decay)


def test_llama_norm_gains_not_decayed():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    decay, no_decay = group_names(model, get_optimizer_grouped_parameters(model, weight_decay=0.1))
    assert no_decay == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                        "model.norm.weight"}


def test_lora_group_gets_lora_lr_and_frozen_params_are_left_out():
    model = convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=2)
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1, lora_lr=1e-3)
    decay, lora, no_decay = group_names(model, groups)
    assert groups[1] == {"params": groups[1]["params"], "weight_decay": 0.1, "lr": 1e-3}
    assert len(lora) == 2 * 6 * 2  # right+left, six Linears per layer, two layers
    assert all("lora_" in n for n in lora)
    # LoRA freezes the wrapped base weights; their biases stay trainable.
    assert "model.decoder.layers.0.fc1.weight" not in decay | lora | no_decay
    assert "model.decoder.layers.0.fc1.bias" in no_decay


def test_custom_no_decay_list():
    model = tiny_opt()
    decay, no_decay = group_names(model, get_optimizer_grouped_parameters(model, 0.1, no_decay_name_list=["bias"]))
    assert "model.decoder.final_layer_norm.weight" in decay and "model.decoder.final_layer_norm.bias" in no_decay


@pytest.mark.parametrize("offload, accelerator, expected", [
    (True, "cpu", "DeepSpeedCPUAdam"), (True, "cuda", "DeepSpeedCPUAdam"),
    (False, "cuda", "FusedAdam"), (False, "cpu", "AdamW"),
])
def test_optimizer_kind(offload, accelerator, expected):
    assert optimizer_kind(offload, accelerator) == expected


def test_create_optimizer_on_cpu_is_torch_adamw_with_groups():
    model = tiny_opt()
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    optimizer = create_optimizer(groups, lr=1e-4, offload=False)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-4]


def test_scheduler_warmup_then_cosine_keeps_lora_lr_ratio():
    model = convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=2)
    optimizer = create_optimizer(get_optimizer_grouped_parameters(model, 0.0, lora_lr=1e-3), lr=1e-4, offload=False)
    scheduler = create_lr_scheduler(optimizer, "cosine", num_warmup_steps=2, num_training_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0, 0.0]
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-5, 5e-4, 5e-5])
