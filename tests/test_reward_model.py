"""Reward model: end-score indices, pairwise loss, forward_value, checkpoint files and key checks."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, LlamaConfig, LlamaModel, OPTConfig, OPTModel

from utils.errors import UserError
from utils.model.reward_model import (
    BACKBONE_PREFIX, RewardModel, answer_end_index, check_reward_state_dict_keys, join_reward_state_dict,
    pairwise_end_index, read_original_reward_checkpoint, read_reward_checkpoint, save_reward_checkpoint,
    split_reward_state_dict)


VALUE_HEAD = "v_head.weight"


# ----------------------------------------------------------------------------- helpers

class StubBackbone(nn.Module):
    """Returns a fixed last_hidden_state: [V, V] per token, so a head of weight [[3, -2]] yields V."""

    def __init__(self, values):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=2)
        self.hidden = torch.stack([values, values], dim=-1)
        self.kwargs_seen = None

    def forward(self, input_ids, **kwargs):
        self.kwargs_seen = kwargs
        return SimpleNamespace(last_hidden_state=self.hidden)


def stub_reward_model(values, pad_token_id, num_padding_at_beginning=0):
    model = RewardModel(StubBackbone(values), pad_token_id, num_padding_at_beginning)
    with torch.no_grad():
        model.v_head.weight.copy_(torch.tensor([[3.0, -2.0]]))
    return model


def tiny_opt():
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=2,
                       ffn_dim=32, num_attention_heads=2, max_position_embeddings=32,
                       pad_token_id=2, bos_token_id=2, eos_token_id=2, dropout=0.0)
    return RewardModel(OPTModel(config).eval(), pad_token_id=2, num_padding_at_beginning=1)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=2, bos_token_id=1, eos_token_id=2)
    return RewardModel(LlamaModel(config).eval(), pad_token_id=2, num_padding_at_beginning=0)


# ----------------------------------------------------------------------------- indices

def test_pairwise_end_index_llama_style_no_leading_pad():
    ids = torch.tensor([[1, 5, 6, 2, 2],    # eos at 3, then padding
                        [1, 5, 6, 7, 8],    # truncated: no eos -> L-1
                        [1, 2, 2, 2, 2]])   # empty answer: eos right after bos
    assert pairwise_end_index(ids, pad_token_id=2, num_padding_at_beginning=0).tolist() == [3, 4, 1]


def test_pairwise_end_index_opt_style_skips_leading_bos():
    ids = torch.tensor([[2, 5, 6, 2, 2],    # bos </s> = pad id at 0, eos at 3
                        [2, 5, 6, 7, 8],    # only the bos is a pad id -> L-1
                        [2, 2, 9, 9, 9]])   # second pad id at 1
    assert pairwise_end_index(ids, pad_token_id=2, num_padding_at_beginning=1).tolist() == [3, 4, 1]
    # Without skipping, the bos itself would be taken.
    assert pairwise_end_index(ids, pad_token_id=2, num_padding_at_beginning=0).tolist() == [0, 0, 0]


def test_answer_end_index_ignores_pads_in_left_padded_prompts():
    prompt_length = 4
    ids = torch.tensor([[2, 2, 1, 7, 8, 9, 2, 2],        # left padding (pad ids) in prompt, eos at 6
                        [1, 5, 2, 7, 8, 9, 10, 11],      # eos inside the prompt, answer never stops -> 7
                        [2, 1, 5, 6, 2, 2, 2, 2]])       # answer is only eos -> 4
    assert answer_end_index(ids, pad_token_id=2, prompt_length=prompt_length).tolist() == [6, 7, 4]


# ----------------------------------------------------------------------------- pairwise forward

def test_pairwise_loss_and_scores_by_hand():
    # OPT-style rows (pad 0 = bos); rows 0,1 chosen, rows 2,3 rejected.
    ids = torch.tensor([[0, 5, 6, 0, 0],     # end 3
                        [0, 5, 7, 8, 9],     # end 4 (truncated)
                        [0, 5, 9, 9, 0],     # end 4
                        [0, 5, 7, 0, 0]])    # end 3
    values = torch.full((4, 5), 100.0)       # a wrong index would read 100
    values[0, 3], values[1, 4], values[2, 4], values[3, 3] = 1.5, -0.5, 0.5, 1.0
    model = stub_reward_model(values, pad_token_id=0, num_padding_at_beginning=1)

    out = model(ids, attention_mask=torch.ones_like(ids))

    assert out["chosen_mean_scores"].tolist() == [1.5, -0.5]
    assert out["rejected_mean_scores"].tolist() == [0.5, 1.0]
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2   # -log σ(1.0), -log σ(-1.5)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert set(model.backbone.kwargs_seen) == {"attention_mask", "use_cache"}   # no head_mask/position_ids


def test_identical_pair_uses_same_index_and_gives_log2():
    model = tiny_opt()
    row = torch.tensor([[2, 5, 6, 7, 2, 2]])
    ids = torch.cat([row, row])
    with torch.no_grad():
        out = model(ids, attention_mask=(ids != 2).long().index_fill(1, torch.tensor([0, 4]), 1))
    assert out["chosen_mean_scores"].item() == out["rejected_mean_scores"].item()
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_pairwise_rejects_odd_batch():
    model = stub_reward_model(torch.zeros(3, 4), pad_token_id=0)
    with pytest.raises(ValueError, match="even"):
        model(torch.ones(3, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- forward_value

def test_forward_value_reads_first_answer_eos():
    ids = torch.tensor([[2, 2, 1, 7, 8, 9, 2, 2],
                        [1, 5, 2, 7, 8, 9, 10, 11],
                        [2, 1, 5, 6, 2, 2, 2, 2]])
    values = torch.arange(24, dtype=torch.float32).reshape(3, 8)   # value = 8*row + position
    model = stub_reward_model(values, pad_token_id=2)

    out = model.forward_value(ids, prompt_length=4)

    assert out["chosen_end_scores"].tolist() == [6.0, 15.0, 20.0]
    torch.testing.assert_close(out["values"], values)
    torch.testing.assert_close(model.forward_value(ids, return_value_only=True), values)
    with pytest.raises(ValueError, match="prompt_length"):
        model.forward_value(ids, prompt_length=1)


# ----------------------------------------------------------------------------- real backbones

def test_head_width_follows_word_embed_proj_dim_and_config_is_untouched():
    opt, llama = tiny_opt(), tiny_llama()
    assert opt.v_head.in_features == 8            # word_embed_proj_dim, not hidden_size 16
    assert llama.v_head.in_features == 16
    assert "n_embd" not in llama.config.to_dict()
    ids = torch.tensor([[2, 5, 6, 2], [2, 7, 2, 2]])
    assert opt.forward_value(ids, return_value_only=True).shape == (2, 4)
    assert opt.rwtranrsformer is opt.backbone
    assert all(k.startswith((BACKBONE_PREFIX, "v_head.")) for k in opt.state_dict())


def test_gradient_checkpointing_and_input_grads_forward_to_backbone():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    assert model.backbone.is_activation_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.backbone.is_activation_checkpointing


def test_enable_input_require_grads_forwards_to_backbone():
    model = tiny_llama()                           # fresh: enabling checkpointing installs the hook too
    model.requires_grad_(False)
    ids = torch.tensor([[1, 5, 6, 2]])
    assert not model.forward_value(ids, return_value_only=True).requires_grad
    model.enable_input_require_grads()             # embeddings' output now requires grad (LoRA + GC)
    assert model.forward_value(ids, return_value_only=True).requires_grad


# ----------------------------------------------------------------------------- state dicts and files

def test_split_join_round_trip():
    state_dict = tiny_opt().state_dict()
    backbone, head = split_reward_state_dict(state_dict)
    assert list(head) == ["v_head.weight"]
    assert "decoder.embed_tokens.weight" in backbone
    joined = join_reward_state_dict(backbone, head)
    assert joined.keys() == state_dict.keys()
    assert all(joined[k] is state_dict[k] for k in state_dict)
    with pytest.raises(ValueError, match="score.weight"):
        split_reward_state_dict({**state_dict, "score.weight": torch.zeros(1)})


def test_key_check_raises_on_missing_head_unexpected_and_shape():
    model = tiny_opt()
    state_dict = model.state_dict()
    check_reward_state_dict_keys(model, state_dict)      # complete: passes

    without_head = {k: v for k, v in state_dict.items() if k != "v_head.weight"}
    with pytest.raises(UserError, match=r"missing keys \(1\): \['v_head.weight'\]"):
        check_reward_state_dict_keys(model, without_head)
    with pytest.raises(UserError, match=r"unexpected keys \(1\): \['rwtranrsformer.decoder.extra'\]"):
        check_reward_state_dict_keys(model, {**state_dict, "rwtranrsformer.decoder.extra": torch.zeros(1)})
    with pytest.raises(UserError, match=r"v_head.weight: checkpoint \(1, 16\) vs model \(1, 8\)"):
        check_reward_state_dict_keys(model, {**state_dict, "v_head.weight": torch.zeros(1, 16)})


def test_key_check_forgives_legacy_rotary_buffer_like_hf():
    model = tiny_llama()
    legacy = f"{BACKBONE_PREFIX}layers.0.self_attn.rotary_emb.inv_freq"   # old persistent buffer
    check_reward_state_dict_keys(model, {**model.state_dict(), legacy: torch.zeros(4)})
    with pytest.raises(UserError, match="rotary_emb.inv_freq"):
        check_reward_state_dict_keys(tiny_opt(), {**tiny_opt().state_dict(),
                                                  f"{BACKBONE_PREFIX}rotary_emb.inv_freq": torch.zeros(4)})


def test_original_layout_pytorch_model_bin_loads(tmp_path):
    source = tiny_opt()
    with torch.no_grad():
        source.v_head.weight.fill_(0.25)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")   # what the original's step 2 wrote

    state_dict = read_original_reward_checkpoint(str(tmp_path))
    state_dict_via_dir, meta = read_reward_checkpoint(str(tmp_path))
    assert meta is None and state_dict_via_dir.keys() == state_dict.keys()

    target = RewardModel(OPTModel(source.config).eval(), pad_token_id=2, num_padding_at_beginning=1)
    check_reward_state_dict_keys(target, state_dict)
    target.load_state_dict(state_dict)
    ids = torch.tensor([[2, 5, 6, 7, 2, 2]])
    torch.testing.assert_close(target.forward_value(ids, prompt_length=3)["chosen_end_scores"],
                               source.forward_value(ids, prompt_length=3)["chosen_end_scores"])


def test_our_layout_round_trip_and_backbone_loads_with_automodel(tmp_path):
    source = tiny_llama()
    save_reward_checkpoint(str(tmp_path), source.state_dict(), source.config, pad_token_id=2,
                           num_padding_at_beginning=0)

    assert json.loads((tmp_path / "reward_model.json").read_text()) == {
        "format_version": 1, "num_padding_at_beginning": 0, "pad_token_id": 2}
    assert list(load_file(os.path.join(tmp_path, "value_head.safetensors"))) == ["v_head.weight"]
    backbone = AutoModel.from_pretrained(str(tmp_path))
    assert isinstance(backbone, LlamaModel)
    torch.testing.assert_close(backbone.embed_tokens.weight, source.backbone.embed_tokens.weight)

    state_dict, meta = read_reward_checkpoint(str(tmp_path))
    assert meta["num_padding_at_beginning"] == 0
    target = RewardModel(backbone, pad_token_id=meta["pad_token_id"])
    check_reward_state_dict_keys(target, state_dict)
    target.load_state_dict(state_dict)
    ids = torch.tensor([[1, 5, 6, 7, 2, 2]])
    torch.testing.assert_close(target.forward_value(ids, return_value_only=True),
                               source.forward_value(ids, return_value_only=True))


def test_save_refuses_a_headless_state_dict(tmp_path):
    model = tiny_opt()
    backbone_only = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    with pytest.raises(ValueError, match="v_head.weight"):
        save_reward_checkpoint(str(tmp_path), backbone_only, model.config, pad_token_id=2,
                               num_padding_at_beginning=1)


def test_key_check_forgives_only_tied_aliases_whose_twin_is_present():
    backbone = StubBackbone(torch.zeros(1, 3))
    backbone.embed = nn.Linear(2, 2, bias=False)
    backbone.tied_copy = backbone.embed                 # one parameter, two state-dict names
    model = RewardModel(backbone, pad_token_id=0)
    state_dict = model.state_dict()
    del state_dict[f"{BACKBONE_PREFIX}tied_copy.weight"]   # what a named_parameters() save writes
    check_reward_state_dict_keys(model, state_dict)
    del state_dict[f"{BACKBONE_PREFIX}embed.weight"]
    with pytest.raises(UserError, match=r"missing keys \(2\)"):
        check_reward_state_dict_keys(model, state_dict)


# ----------------------------------------------------------------------------- float32 head, lazy reading

def test_bf16_scores_are_float32_from_the_bf16_hidden_states():
    """A bf16 reward model (as a bf16 engine casts it) scores in float32 from its bf16 hidden
    states and bf16 head weight: not rounded to bf16 (steps of 0.016-0.031 at |r| 2-8)."""
    model = tiny_opt().to(torch.bfloat16)         # DeepSpeed's cast of a bf16 engine: every parameter
    with torch.no_grad():                         # scores of a trained model's size (|r| ~ 2-8)
        model.v_head.weight.mul_(40.0)
    assert model.v_head.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = model.forward_value(ids, return_value_only=True)
        hidden = model.backbone(input_ids=ids).last_hidden_state          # bf16
        expected = (hidden.double() @ model.v_head.weight.double().t()).squeeze(-1)
        rounded = torch.nn.functional.linear(hidden, model.v_head.weight).squeeze(-1)  # old bf16 head
    assert hidden.dtype == torch.bfloat16 and values.dtype == torch.float32
    torch.testing.assert_close(values.double(), expected, rtol=1e-6, atol=1e-6)
    assert values.abs().max() > 2
    assert (values != values.bfloat16().float()).float().mean() > 0.9      # not bf16 numbers
    assert (rounded.float() - expected).abs().max() > 1e-3                # what the bf16 head lost
    end = model.forward_value(ids, prompt_length=4)["chosen_end_scores"]
    assert end.dtype == torch.float32


def test_v_head_is_initialised_in_float32_then_stored_in_the_backbone_dtype():
    config = tiny_opt().config
    torch.manual_seed(3)
    backbone = OPTModel(config).to(torch.bfloat16)
    state = torch.random.get_rng_state()
    model = RewardModel(backbone, pad_token_id=2)
    torch.random.set_rng_state(state)
    fp32_head = nn.Linear(8, 1, bias=False)
    assert model.v_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.v_head.weight, fp32_head.weight.detach().to(torch.bfloat16))
    assert tiny_opt().v_head.weight.dtype == torch.float32


def test_bf16_pairwise_training_step_has_finite_float32_loss_and_lowers_it():
    """Stage 2's path in a bf16 engine: the loss is float32, gradients reach the bf16 head and
    backbone through the float32 head, and SGD steps lower the loss."""
    model = tiny_opt().to(torch.bfloat16).train()
    chosen = torch.tensor([[2, 5, 6, 7, 2, 2], [2, 9, 8, 2, 2, 2]])
    rejected = torch.tensor([[2, 5, 6, 11, 12, 2], [2, 9, 13, 14, 2, 2]])
    ids = torch.cat([chosen, rejected])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        out = model(ids, attention_mask=torch.ones_like(ids))
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        optimizer.zero_grad()
        out["loss"].backward()
        assert model.v_head.weight.grad.dtype == torch.bfloat16
        assert model.v_head.weight.grad.abs().sum() > 0
        assert model.backbone.decoder.layers[0].fc1.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]


def _saved_reward_dir(tmp_path, dtype=torch.float32):
    source = tiny_llama().to(dtype)
    save_reward_checkpoint(str(tmp_path), source.state_dict(), source.config, pad_token_id=2,
                           num_padding_at_beginning=0)
    return source


def test_lazy_checkpoint_reads_shapes_without_tensors_and_one_tensor_per_access(tmp_path):
    from utils.model.reward_model import open_reward_checkpoint

    source = _saved_reward_dir(tmp_path)
    reads = []
    with open_reward_checkpoint(str(tmp_path)) as (state, meta):
        state._entries = {key: (lambda name, read=read: reads.append(name) or read(name), name, shape)
                          for key, (read, name, shape) in state._entries.items()}   # count reads
        assert meta["pad_token_id"] == 2
        assert set(state) == set(source.state_dict())
        check_reward_state_dict_keys(source, state)            # shapes from the headers only
        assert reads == [] and state.shape_of(VALUE_HEAD) == (1, 16)
        embed = state[f"{BACKBONE_PREFIX}embed_tokens.weight"]
        assert reads == ["embed_tokens.weight"]                  # one tensor, the one asked for
        assert torch.equal(embed, source.backbone.embed_tokens.weight)
        wrong = {**source.state_dict(), VALUE_HEAD: torch.zeros(1, 8)}
        with pytest.raises(UserError, match=r"v_head.weight: checkpoint \(1, 8\) vs model \(1, 16\)"):
            check_reward_state_dict_keys(source, wrong)
    with pytest.raises(Exception, match="closed"):
        state[VALUE_HEAD]                                       # the files are closed


def test_lazy_original_layout_is_memory_mapped(tmp_path, monkeypatch):
    source = tiny_opt()
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    from utils.model.reward_model import open_reward_checkpoint

    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    with open_reward_checkpoint(str(tmp_path)) as (state, meta):
        assert meta is None and set(state) == set(source.state_dict())
        check_reward_state_dict_keys(source, state)
        assert torch.equal(state[VALUE_HEAD], source.v_head.weight)
    assert [kw.get("mmap") for kw in calls] == [True]            # mapped, not read whole

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(source.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    calls.clear()
    with open_reward_checkpoint(str(legacy)) as (state, _):
        assert torch.equal(state[VALUE_HEAD], source.v_head.weight)
    assert [kw.get("mmap") for kw in calls] == [False]           # the legacy format cannot be mapped
