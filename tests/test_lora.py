"""LoRA layers, and a merged export that leaves the training model untouched (the original fused
in place)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from utils.module.lora import (LinearLayer_LoRA, convert_linear_layer_to_lora, find_lora_target_modules,
                               lora_merged_state_dict, make_model_gradient_checkpointing_compatible,
                               merge_lora_weight, only_optimize_lora_parameters)

OPT_CONFIG = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                  max_position_embeddings=64, word_embed_proj_dim=16)
LLAMA_CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2)


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**OPT_CONFIG)).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG)).eval()


def randomise_lora(model, seed=1):
    """Non-zero left factors so LoRA changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearLayer_LoRA):
                module.lora_left_weight.copy_(0.5 * torch.randn(module.lora_left_weight.shape, generator=generator))


def small_lora_layer():
    """2 -> 3 Linear with hand-checkable weights, rank 2, lora_scaling 4 -> scaling 2."""
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    layer = LinearLayer_LoRA(linear.weight, lora_dim=2, lora_scaling=4, bias=linear.bias)
    with torch.no_grad():
        layer.lora_right_weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))           # R: [in=2, r=2]
        layer.lora_left_weight.copy_(torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.1]]))  # L: [r=2, out=3]
    return layer


def test_layer_forward_by_hand():
    layer = small_lora_layer()
    assert layer.lora_scaling == 2.0
    x = torch.tensor([[1.0, 2.0]])
    # x W^T + b = [1, 2, 3] + [0.5, -0.5, 0] = [1.5, 1.5, 3];  x R = [1, 4];  x R L = [0.1, 0, 0.4];  * 2
    assert torch.allclose(layer(x), torch.tensor([[1.7, 1.5, 3.8]]))


def test_merge_lora_weight_by_hand():
    layer = small_lora_layer()
    merged = merge_lora_weight(layer.weight, layer.lora_left_weight, layer.lora_right_weight, layer.lora_scaling)
    # 2 * L^T R^T = 2 * [[0.1, 0], [0, 0], [0, 0.2]]
    assert torch.allclose(merged, torch.tensor([[1.2, 0.0], [0.0, 1.0], [1.0, 1.4]]))
    assert torch.allclose(nn.functional.linear(torch.tensor([[1.0, 2.0]]), merged, layer.bias), layer(torch.tensor([[1.0, 2.0]])))


def test_fuse_unfuse_round_trip():
    layer = small_lora_layer()
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    expected, base = layer(x), layer.weight.clone()
    layer.fuse_lora()
    assert layer.fused and torch.allclose(layer(x), expected)
    layer.unfuse_lora()
    assert not layer.fused and torch.allclose(layer.weight, base) and torch.allclose(layer(x), expected)


def test_layer_parameters_and_init_bound():
    linear = nn.Linear(256, 8)
    layer = LinearLayer_LoRA(linear.weight, lora_dim=4, bias=linear.bias)
    assert layer.lora_right_weight.shape == (256, 4) and layer.lora_left_weight.shape == (4, 8)
    assert torch.count_nonzero(layer.lora_left_weight) == 0
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    # kaiming_uniform_(a=sqrt(5)) on [in, r]: fan_in = r = 4, bound = 1/sqrt(4) = 0.5 (1/sqrt(256) would be 0.0625)
    bound = layer.lora_right_weight.abs().max().item()
    assert 0.45 < bound <= 0.5
    assert layer.lora_scaling == 1 / 4


def test_lora_dim_must_be_positive():
    with pytest.raises(ValueError, match="lora_dim > 0"):
        LinearLayer_LoRA(nn.Linear(2, 3).weight, lora_dim=0)
    with pytest.raises(ValueError, match="lora_dim > 0"):
        convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=0)


def test_convert_matches_opt_layers_and_keeps_outputs_at_init():
    model = tiny_opt()
    input_ids = torch.tensor([[2, 5, 7, 9, 11]])
    expected = model(input_ids).logits
    names = find_lora_target_modules(model, "decoder.layers.")
    assert len(names) == 12 and "model.decoder.layers.0.self_attn.q_proj" in names and "lm_head" not in names
    convert_linear_layer_to_lora(model, "decoder.layers.", lora_dim=4)
    assert sum(isinstance(m, LinearLayer_LoRA) for m in model.modules()) == 12
    assert isinstance(model.lm_head, nn.Linear)
    # left factors are zeros, so the LoRA model starts as the base model
    assert torch.allclose(model(input_ids).logits, expected, atol=1e-6)


def test_zero_matches_is_a_clear_error():
    model = tiny_llama()
    assert find_lora_target_modules(model, "decoder.layers.") == []  # the original's default, on Llama
    with pytest.raises(ValueError, match=r"--actor_lora_module_name 'decoder.layers.'.*'layers.' for Llama"):
        convert_linear_layer_to_lora(model, "decoder.layers.", lora_dim=4, flag_name="--actor_lora_module_name")
    convert_linear_layer_to_lora(model, "layers.", lora_dim=4)
    assert sum(isinstance(m, LinearLayer_LoRA) for m in model.modules()) == 14


def test_only_optimize_lora_parameters():
    model = only_optimize_lora_parameters(convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 24
    assert all(n.endswith(("lora_right_weight", "lora_left_weight")) for n in trainable)


@pytest.mark.parametrize("family, part", [("opt", "decoder.layers."), ("llama", "layers.")])
def test_merged_state_dict_round_trip(family, part):
    build, config = (tiny_opt, OPTConfig(**OPT_CONFIG)) if family == "opt" else (tiny_llama, LlamaConfig(**LLAMA_CONFIG))
    model = convert_linear_layer_to_lora(build(), part, lora_dim=4)
    randomise_lora(model)
    input_ids = torch.tensor([[2, 5, 7, 9, 11, 3]])
    lora_logits = model(input_ids).logits
    plain_logits = build()(input_ids).logits
    assert not torch.allclose(lora_logits, plain_logits, atol=1e-3)  # LoRA really changes the output

    merged = lora_merged_state_dict(model)
    assert not any("lora" in key for key in merged)
    fresh = (OPTForCausalLM if family == "opt" else LlamaForCausalLM)(config).eval()
    assert set(merged) == set(fresh.state_dict())
    fresh.load_state_dict(merged, strict=True)
    assert torch.allclose(fresh(input_ids).logits, lora_logits, atol=1e-5)


def test_merging_leaves_the_training_model_unchanged():
    model = convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=4)
    randomise_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora_merged_state_dict(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.fused for m in model.modules() if isinstance(m, LinearLayer_LoRA))
    # the export is a copy: writing into it does not reach the model
    merged["model.decoder.embed_tokens.weight"].zero_()
    assert torch.equal(model.model.decoder.embed_tokens.weight, before["model.decoder.embed_tokens.weight"])
    # and LoRA still trains after an export (the original's fused layers got no gradient)
    model.train()
    model(torch.tensor([[2, 5, 7]])).logits.sum().backward()
    assert model.model.decoder.layers[0].self_attn.q_proj.lora_left_weight.grad.abs().sum() > 0


def test_gradient_checkpointing_compatible_makes_embeddings_require_grad():
    model = only_optimize_lora_parameters(convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=2))
    make_model_gradient_checkpointing_compatible(model)
    captured = {}

    def record_input(module, args):
        captured["requires_grad"] = args[0].requires_grad

    handle = model.model.decoder.layers[0].register_forward_pre_hook(record_input)
    model(torch.tensor([[2, 5, 7]]))
    handle.remove()
    assert captured["requires_grad"]


ZERO3_SCRIPT = textwrap.dedent("""
    import torch, deepspeed
    from transformers import OPTConfig, OPTForCausalLM
    from utils.ds_utils import get_train_ds_config, set_batch_sizes
    from utils.module.lora import LinearLayer_LoRA, convert_linear_layer_to_lora, lora_merged_state_dict

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16))
    convert_linear_layer_to_lora(model, "decoder.layers.", lora_dim=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearLayer_LoRA):
                m.lora_left_weight.normal_()
    expected = lora_merged_state_dict(model)
    deepspeed.init_distributed(dist_backend="gloo")
    config = set_batch_sizes(get_train_ds_config(False, stage=3, precision="fp32"), 1, 2, 1)
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    q = engine.module.model.decoder.layers[0].self_attn.q_proj
    assert q.weight.numel() == 0 and hasattr(q.lora_left_weight, "ds_id"), "not partitioned"
    merged = lora_merged_state_dict(engine.module)
    assert set(merged) == set(expected), set(merged) ^ set(expected)
    for k in expected:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k
    assert q.weight.numel() == 0  # released again after the gather
    print("ZERO3_MERGE_OK", torch.distributed.get_rank())
""")


@pytest.mark.slow
def test_merged_state_dict_under_zero3_two_ranks(tmp_path):
    script = tmp_path / "zero3_merge.py"
    script.write_text(ZERO3_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=repo)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", str(script)],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.count("ZERO3_MERGE_OK") == 2, result.stdout[-3000:] + result.stderr[-3000:]


def test_lora_factors_are_drawn_in_float32_whatever_the_weight_dtype():
    """A bf16-loaded model gets the factors an fp32-loaded one gets after DeepSpeed's cast."""
    import torch

    from utils.module.lora import LinearLayer_LoRA

    weight = torch.nn.Parameter(torch.randn(6, 10))
    torch.manual_seed(3)
    fp32 = LinearLayer_LoRA(weight, lora_dim=4)
    torch.manual_seed(3)
    bf16 = LinearLayer_LoRA(torch.nn.Parameter(weight.detach().bfloat16()), lora_dim=4)
    assert bf16.lora_right_weight.dtype == torch.bfloat16
    assert torch.equal(bf16.lora_right_weight, fp32.lora_right_weight.bfloat16())
