"""The hybrid-engine compatibility check: DeepSpeed's own guard on the installed transformers' real OPT
and Llama decoder layers and on mocked layers of each return contract, the decoder-loop reading, the
fallback in `resolve_hybrid_engine`, and the runtime greedy comparison."""
import inspect
import logging

import pytest
import torch
from torch import nn
from transformers.cache_utils import Cache

from utils import ds_utils
from utils import hybrid_engine_check as check
from utils.ds_utils import resolve_hybrid_engine
from utils.hybrid_engine_check import (TENSOR, TUPLE, UNKNOWN, VERDICT_TAG, deepspeed_guard_skips,
                                       deepspeed_injected_layer_classes, greedy_matches_reference,
                                       hybrid_engine_layer_contract, layer_output_contract,
                                       loop_output_contract, model_layer_contract, runtime_check_message)
from utils.model.tiny_models import _model_config


def tiny_config(family):
    return _model_config(family, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                         max_positions=512)


def meta_model(family):
    return check._meta_causal_lm(tiny_config(family))


# ------------------------------------------------------------- the installed libraries' facts

def test_deepspeed_guard_does_not_fire_on_the_installed_opt_layer():
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    parameters = inspect.signature(OPTDecoderLayer.forward).parameters
    assert "cache" in parameters  # transformers 5.24's name, which the guard does not look for
    assert not deepspeed_guard_skips(OPTDecoderLayer)


@pytest.mark.parametrize("family, layer, policy", [
    ("opt", "OPTDecoderLayer", "HFOPTLayerPolicy"),
    ("llama", "LlamaDecoderLayer", "LLAMALayerPolicy"),
])
def test_deepspeed_would_inject_the_installed_decoder_layers(family, layer, policy):
    injected = deepspeed_injected_layer_classes(meta_model(family))
    assert {cls.__name__: name for cls, name in injected.items()} == {layer: policy}
    # The reproduced condition (the fallback for a DeepSpeed whose method needs more) agrees.
    assert check._reproduced_injected_layer_classes(meta_model(family)) == injected


def test_installed_decoder_loops_pass_the_layer_output_on_as_a_tensor():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
    from transformers.models.opt.modeling_opt import OPTDecoder, OPTDecoderLayer

    assert loop_output_contract(OPTDecoder) == TENSOR
    assert loop_output_contract(LlamaModel) == TENSOR
    assert layer_output_contract(OPTDecoderLayer) == TENSOR
    assert layer_output_contract(LlamaDecoderLayer) == TENSOR


def test_deepspeed_injected_layers_follow_the_tuple_contract():
    """What the verdict relies on: the hybrid engine keeps the inference config's default
    return_tuple=True, and the layer wraps (output, presents) whenever use_cache is on."""
    from deepspeed.inference.config import DeepSpeedInferenceConfig
    from deepspeed.model_implementations.transformers.ds_transformer import \
        DeepSpeedTransformerInference
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

    assert DeepSpeedInferenceConfig().return_tuple is True
    assert "return_tuple" not in inspect.getsource(DeepSpeedHybridEngine.new_inference_container)
    assert "output = (output, presents)" in inspect.getsource(DeepSpeedTransformerInference.forward)


@pytest.mark.parametrize("family, layer", [("opt", "OPTDecoderLayer"), ("llama", "LlamaDecoderLayer")])
def test_check_says_incompatible_for_the_installed_families(family, layer, tmp_path):
    compatible, reason = hybrid_engine_layer_contract(tiny_config(family))
    assert compatible is False
    assert layer in reason and "tensor" in reason
    tiny_config(family).save_pretrained(tmp_path)  # a checkpoint directory works the same, no weights
    assert hybrid_engine_layer_contract(str(tmp_path)) == (compatible, reason)


def no_policy_config(family):
    from transformers import MistralConfig, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def test_an_enabled_hybrid_engine_with_nothing_to_inject_still_builds_its_op():
    """The facts behind the no-policy verdict: the engine creates its inference workspace op in
    any case, drops its policies (keeping the model's own generate) when no decoder layer matches
    one, and swaps its generate (the one that gathers ZeRO-3 parameters) in only after injecting."""
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

    assert "self.workspace = WorkspaceOp()" in inspect.getsource(DeepSpeedHybridEngine.__init__)
    populate = inspect.getsource(DeepSpeedHybridEngine.populate_all_inference_policies)
    assert "No compatible DeepSpeed inference policy found" in populate
    create = inspect.getsource(DeepSpeedHybridEngine.create_inference_module)
    swap = create.index("self.module.generate = self.generate")
    assert create.rindex("if len(self._inference_containers) > 0:", 0, swap) > 0


@pytest.mark.parametrize("family, layer", [("qwen2", "Qwen2DecoderLayer"),
                                           ("mistral", "MistralDecoderLayer")])
def test_model_types_without_a_deepspeed_policy_fall_back(family, layer, tmp_path, fresh_log,
                                                          caplog):
    config = no_policy_config(family)
    assert deepspeed_injected_layer_classes(check._meta_causal_lm(config)) == {}
    compatible, reason = hybrid_engine_layer_contract(config)
    assert compatible is False
    assert f"DeepSpeed has no inference policy for {layer}" in reason
    assert "would inject nothing" in reason and "transformer_inference" in reason
    config.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="utils.ds_utils"):
        assert resolve_hybrid_engine(True, "cuda", model_path=str(tmp_path)) is False
    warnings = [r.getMessage() for r in caplog.records if VERDICT_TAG in r.getMessage()]
    assert len(warnings) == 1 and layer in warnings[0]
    assert "falls back to the Hugging Face path" in warnings[0]


def test_check_counts_an_unreadable_config_as_incompatible(tmp_path):
    compatible, reason = hybrid_engine_layer_contract(str(tmp_path / "missing"))
    assert compatible is False and reason.startswith("could not check")


# ----------------------------------------------------------------------------- mocked layers

class LegacyTupleLayer(nn.Module):
    """transformers 4.3x: returns (hidden_states, present), takes `past_key_value`."""

    def forward(self, hidden_states, attention_mask=None, layer_head_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False) -> tuple:
        return hidden_states, None


class CacheTensorLayer(nn.Module):
    """transformers 5.24: returns the tensor, takes `cache`."""

    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False,
                position_ids=None, **kwargs) -> torch.Tensor:
        return hidden_states


class PastKeyValuesTensorLayer(nn.Module):
    def forward(self, hidden_states, attention_mask=None, past_key_values=None,
                use_cache=False) -> torch.Tensor:
        return hidden_states


class CachePositionTensorLayer(nn.Module):
    def forward(self, hidden_states, attention_mask=None, past_key_value=None, cache_position=None,
                use_cache=False) -> torch.Tensor:
        return hidden_states


class CacheObjectTupleLayer(nn.Module):
    """transformers 4.36-4.37: returns a tuple, but `past_key_value` is a Cache object."""

    def forward(self, hidden_states, attention_mask=None, past_key_value: Cache | None = None,
                use_cache=False) -> tuple:
        return hidden_states, None


class CachePositionTupleLayer(nn.Module):
    """transformers 4.38-4.4x: returns a tuple, takes a Cache object and `cache_position`."""

    def forward(self, hidden_states, attention_mask=None, past_key_value: Cache | None = None,
                cache_position=None, use_cache=False) -> tuple:
        return hidden_states, None


class UnannotatedLayer(nn.Module):
    def forward(self, hidden_states, cache=None):
        return hidden_states


class ModernDecoder(nn.Module):
    def __init__(self, layer_cls):
        super().__init__()
        self.layers = nn.ModuleList([layer_cls(), layer_cls()])
        self.norm = nn.LayerNorm(4)

    def forward(self, hidden_states, cache=None):
        for decoder_layer in self.layers[:2]:
            hidden_states = decoder_layer(hidden_states, cache=cache, use_cache=True)
        return self.norm(hidden_states)


class LegacyDecoder(ModernDecoder):
    def forward(self, hidden_states, past_key_values=None):
        for idx, decoder_layer in enumerate(self.layers):
            layer_outputs = decoder_layer(hidden_states, past_key_value=None, use_cache=True)
            hidden_states = layer_outputs[0]
        return self.norm(hidden_states)


class OpaqueDecoder(ModernDecoder):
    def forward(self, hidden_states):
        for decoder_layer in self.layers:
            hidden_states = self._run(decoder_layer, hidden_states)
        return self.norm(hidden_states)

    def _run(self, layer, hidden_states):
        return layer(hidden_states)


class MockCausalLM(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.model = decoder
        self.lm_head = nn.Linear(4, 8)


SLOTS = {"opt": ("transformers.models.opt.modeling_opt", "OPTDecoderLayer", "HFOPTLayerPolicy"),
         "llama": ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LLAMALayerPolicy")}


@pytest.fixture
def in_policy_slot(monkeypatch):
    """Make DeepSpeed's policy for `slot` pick up a mocked layer class, as it picks up the real one."""
    import importlib

    from deepspeed.module_inject.containers.llama import LLAMALayerPolicy
    from deepspeed.module_inject.containers.opt import HFOPTLayerPolicy

    # DeepSpeed's policies remember the last class in a class attribute: restore both after the test.
    monkeypatch.setattr(HFOPTLayerPolicy, "_orig_layer_class", HFOPTLayerPolicy._orig_layer_class)
    monkeypatch.setattr(LLAMALayerPolicy, "_orig_layer_class", LLAMALayerPolicy._orig_layer_class)

    def put(layer_cls, slot):
        module_name, class_name, _ = SLOTS[slot]
        monkeypatch.setattr(importlib.import_module(module_name), class_name, layer_cls)

    return put


@pytest.mark.parametrize("layer_cls, decoder_cls, slot, injected, compatible", [
    (LegacyTupleLayer, LegacyDecoder, "opt", True, True),            # the contract DeepSpeed targets
    (CacheTensorLayer, ModernDecoder, "opt", True, False),           # transformers 5.24 OPT
    (PastKeyValuesTensorLayer, ModernDecoder, "opt", False, False),  # guard fires: nothing injected
    (CachePositionTensorLayer, ModernDecoder, "opt", False, False),  # guard fires: nothing injected
    (CacheTensorLayer, ModernDecoder, "llama", True, False),         # transformers 5.24 Llama
    (PastKeyValuesTensorLayer, ModernDecoder, "llama", True, False),  # no guard for Llama at all
    (LegacyTupleLayer, LegacyDecoder, "llama", True, True),
    (LegacyTupleLayer, ModernDecoder, "opt", True, False),           # the loop decides, not the annotation
    (UnannotatedLayer, OpaqueDecoder, "opt", True, False),           # cannot tell: not shown safe
    (CacheObjectTupleLayer, LegacyDecoder, "opt", True, False),      # tuple, but a Cache object
    (CachePositionTupleLayer, LegacyDecoder, "opt", False, False),   # guard fires: nothing injected
    (CachePositionTupleLayer, LegacyDecoder, "llama", True, False),  # ... but not for Llama
    (CacheTensorLayer, ModernDecoder, None, False, False),           # no policy: nothing injected
])
def test_mocked_layer_contracts(in_policy_slot, layer_cls, decoder_cls, slot, injected, compatible):
    if slot is not None:
        in_policy_slot(layer_cls, slot)
    model = MockCausalLM(decoder_cls(layer_cls))
    classes = deepspeed_injected_layer_classes(model)
    assert (layer_cls in classes) is injected
    if injected:
        assert classes[layer_cls] == SLOTS[slot][2]
    assert check._reproduced_injected_layer_classes(model) == classes
    verdict, reason = model_layer_contract(model)
    assert verdict is compatible, reason
    if not compatible:
        assert layer_cls.__name__ in reason
    if not injected:   # the engine would only build its op: HF generate (and our ZeRO-3 gather)
        why = "guard against modern decoders skips" if slot else "has no inference policy for"
        assert why in reason and "would inject nothing" in reason, reason


def test_reason_names_the_guard_miss(in_policy_slot):
    in_policy_slot(CacheTensorLayer, "opt")
    _, reason = model_layer_contract(MockCausalLM(ModernDecoder(CacheTensorLayer)))
    assert "cache_position / past_key_values" in reason and "cache" in reason
    in_policy_slot(CacheTensorLayer, "llama")
    _, reason = model_layer_contract(MockCausalLM(ModernDecoder(CacheTensorLayer)))
    assert "only looks at OPT layers" in reason


@pytest.mark.parametrize("layer_cls, expected", [
    (LegacyTupleLayer, TUPLE), (CacheTensorLayer, TENSOR), (UnannotatedLayer, UNKNOWN)])
def test_layer_output_contract_from_the_annotation(layer_cls, expected):
    assert layer_output_contract(layer_cls) == expected


def test_cache_object_parameters():
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    assert check.cache_object_parameters(LegacyTupleLayer) == []
    assert check.cache_object_parameters(CacheObjectTupleLayer) == ["past_key_value"]
    assert check.cache_object_parameters(CachePositionTupleLayer) == ["past_key_value", "cache_position"]
    assert check.cache_object_parameters(OPTDecoderLayer) == ["cache"]


@pytest.mark.parametrize("decoder_cls, expected", [
    (ModernDecoder, TENSOR), (LegacyDecoder, TUPLE), (OpaqueDecoder, UNKNOWN)])
def test_loop_output_contract_from_the_source(decoder_cls, expected):
    assert loop_output_contract(decoder_cls) == expected


# ------------------------------------------------------------------- resolve_hybrid_engine

@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(ds_utils, "_logged_once", set())


def test_resolve_falls_back_with_one_warning_on_cuda(fresh_log, caplog, tmp_path):
    tiny_config("opt").save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="utils.ds_utils"):
        assert resolve_hybrid_engine(True, "cuda", model_path=str(tmp_path)) is False
        assert resolve_hybrid_engine(True, "cuda", model_path=str(tmp_path)) is False
    warnings = [r.getMessage() for r in caplog.records if VERDICT_TAG in r.getMessage()]
    assert len(warnings) == 1
    assert "OPTDecoderLayer" in warnings[0] and "falls back to the Hugging Face path" in warnings[0]


def test_resolve_keeps_a_compatible_model_on_cuda(fresh_log, caplog, monkeypatch):
    monkeypatch.setattr(check, "hybrid_engine_layer_contract", lambda path: (True, "fine"))
    with caplog.at_level(logging.WARNING, logger="utils.ds_utils"):
        assert resolve_hybrid_engine(True, "cuda", model_path="/models/any") is True
        assert resolve_hybrid_engine(True, "cuda") is True
        assert resolve_hybrid_engine(False, "cuda", model_path="/models/any") is False
    assert not caplog.records


def test_resolve_on_cpu_does_not_run_the_check(fresh_log, caplog, monkeypatch):
    def fail(path):
        raise AssertionError("the layer check must not run off CUDA")

    monkeypatch.setattr(check, "hybrid_engine_layer_contract", fail)
    with caplog.at_level(logging.WARNING, logger="utils.ds_utils"):
        assert resolve_hybrid_engine(True, "cpu", model_path="/models/any") is False
    assert [r.getMessage() for r in caplog.records if "--enable_hybrid_engine" in r.getMessage()]


# ----------------------------------------------------------------- greedy_matches_reference

PROMPTS = torch.tensor([[5, 6, 7], [8, 9, 10]])
MASK = torch.ones_like(PROMPTS)


def fixed(answers):
    """A fake generate: returns the prompts followed by `answers` and records its arguments."""
    def generate(input_ids, attention_mask, max_new_tokens, do_sample):
        generate.calls.append((max_new_tokens, do_sample))
        return torch.cat([input_ids, torch.tensor(answers)], dim=1)

    generate.calls = []
    return generate


def test_greedy_match():
    a, b = fixed([[1, 2, 3], [4, 5, 6]]), fixed([[1, 2, 3], [4, 5, 6]])
    assert greedy_matches_reference(a, b, PROMPTS, MASK, max_new_tokens=3) == (True, None)
    assert a.calls == b.calls == [(3, False)]


def test_greedy_first_divergence_is_the_earliest_position():
    a = fixed([[1, 2, 3, 9], [4, 0, 6, 7]])
    b = fixed([[1, 2, 0, 9], [4, 5, 6, 7]])
    assert greedy_matches_reference(a, b, PROMPTS, MASK) == (
        False, {"row": 1, "position": 1, "a": 0, "b": 5})


def test_greedy_shorter_answer_diverges_where_it_stopped():
    ok, info = greedy_matches_reference(fixed([[1, 2], [4, 5]]), fixed([[1, 2, 3], [4, 5, 6]]),
                                        PROMPTS, MASK)
    assert not ok and info == {"row": 0, "position": 2, "a": -1, "b": 3}


def test_greedy_reads_sequences_and_reports_a_crash():
    class Output:
        def __init__(self, sequences):
            self.sequences = sequences

    def with_sequences(**kwargs):
        return Output(fixed([[1], [2]])(**kwargs))

    def crashes(**kwargs):
        raise AttributeError("'tuple' object has no attribute 'shape'")

    assert greedy_matches_reference(with_sequences, fixed([[1], [2]]), PROMPTS, MASK) == (True, None)
    ok, info = greedy_matches_reference(crashes, fixed([[1], [2]]), PROMPTS, MASK)
    assert not ok and info["error"].startswith("generate_a raised AttributeError")
    assert runtime_check_message(ok, info).startswith(f"{VERDICT_TAG} runtime: mismatch")
    assert "match the Hugging Face path" in runtime_check_message(True, None)
