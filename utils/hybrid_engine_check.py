"""Is DeepSpeed's hybrid engine safe for this model? A static check of the decoder-layer contract,
and a runtime comparison of two generate callables.

DeepSpeed's hybrid engine replaces each decoder layer it has a policy for with an injected inference
layer, and that layer returns a tuple: `(output, presents)` whenever `use_cache` is on, as it is in
`generate` (deepspeed/model_implementations/transformers/ds_transformer.py, the end of
`DeepSpeedTransformerInference.forward`). Decoder loops written for that legacy contract take element
0 of each layer's output; loops written for the modern one (transformers 5: `hidden_states =
decoder_layer(...)`) hand the return value straight to the next layer and to the final norm. DeepSpeed
skips injection for "modern" decoders with one guard (`populate_all_inference_policies`), which only
looks at OPT and only for parameters named `cache_position` or `past_key_values`; transformers 5.24
names it `cache`, and Llama has no guard at all. So the check below runs DeepSpeed's own guard, then
asks the decoder loop which contract it expects (and whether the layers get transformers' cache object,
which the injected layer ignores), and says "incompatible" whenever they disagree with what the injected
layer does or it cannot tell. A model DeepSpeed would inject nothing into (no policy: Qwen2, Mistral,
...) is incompatible too: the engine would still build its inference op, and its generate, which
gathers ZeRO-3 parameters once, is only swapped in when it injected something
(deepspeed/runtime/hybrid_engine.py:60 and 428-430). See docs/gpu.md for the facts and their
file:line references.
"""
import ast
import inspect
import os
import textwrap
import types

import torch

# Every message of this check starts with it, so logs (and scripts/gpu_smoke.py) can find them.
VERDICT_TAG = "[hybrid-engine check]"

TENSOR, TUPLE, UNKNOWN = "tensor", "tuple", "unknown"


# ------------------------------------------------------------------------- the static check

def hybrid_engine_layer_contract(model_config_or_path):
    """(compatible, reason) for DeepSpeed's hybrid engine on the causal LM a config describes.

    `model_config_or_path`: a `PretrainedConfig`, or a directory / hub id `AutoConfig` reads. No
    weights are loaded: the model is built on the meta device from transformers' causal-LM auto
    mapping. Anything that stops the check (an unknown model type, an unreadable config) counts as
    incompatible, so an unchecked model never generates through the injected kernels.
    """
    try:
        config = _load_config(model_config_or_path)
        model = _meta_causal_lm(config)
    except Exception as err:  # noqa: BLE001 - any failure means "not shown to be safe"
        return False, f"could not check the decoder-layer contract ({type(err).__name__}: {err})"
    return model_layer_contract(model)


def model_layer_contract(model):
    """(compatible, reason) for an instantiated module tree (meta tensors are enough).

    Compatible only when DeepSpeed injects decoder layers and every one it injects follows the
    legacy contract its inference layers implement: the decoder loop takes element 0 of each
    layer's output, and each layer gets its own past (key, value) tuple rather than transformers'
    cache object. Injecting nothing (no policy for the model's layers, as for Qwen2 or Mistral, or
    DeepSpeed's guard skipped them) is incompatible too: the engine would generate with the
    model's own modules through the plain Hugging Face `generate` (it swaps in its own, which
    gathers ZeRO-3 parameters once, only when it injected something), yet still build the
    transformer_inference op and hold its workspace; without it the project's own ZeRO-3 gather
    (utils/zero3_generation.py) applies. Otherwise incompatible, with the reason.
    """
    injected = deepspeed_injected_layer_classes(model)
    if not injected:
        return False, _nothing_injected_reason(model)
    lists = _decoder_layer_lists(model)
    for layer_cls, policy_name in injected.items():
        owners = [(owner, attr) for owner, attr, cls in lists if cls is layer_cls]
        if not owners:
            return False, (f"DeepSpeed would replace {layer_cls.__name__} ({policy_name}) with its "
                           "inference layer, and no decoder loop over these layers was found to check")
        for owner, attr in owners:
            loop = loop_output_contract(type(owner), attr)
            expected = loop if loop != UNKNOWN else layer_output_contract(layer_cls)
            where = f"{type(owner).__name__}.forward"
            if expected == TENSOR:
                return False, (
                    f"DeepSpeed would replace {layer_cls.__name__} ({policy_name}) with its inference "
                    "layer, which returns a tuple ((output, presents) when generating), but "
                    f"{where} passes each layer's return value on as a tensor; DeepSpeed's guard "
                    f"against modern decoders did not fire ({_guard_note(layer_cls, policy_name)})")
            if expected != TUPLE:
                return False, (f"could not establish whether {where} expects a tensor or a tuple "
                               f"from {layer_cls.__name__}, which DeepSpeed would replace with its "
                               "inference layer")
        cache_names = cache_object_parameters(layer_cls)
        if cache_names:
            return False, (
                f"DeepSpeed would replace {layer_cls.__name__} ({policy_name}) with its inference "
                "layer, which keeps its own key/value cache, but the decoder passes a transformers "
                f"cache object ({', '.join(cache_names)}) that the injected layer would leave "
                "un-updated")
    names = ", ".join(sorted(cls.__name__ for cls in injected))
    return True, (f"{names}: the decoder loop takes element 0 of each layer's output and hands each "
                  "layer its own past key/values, the legacy contract DeepSpeed's inference layers follow")


def _nothing_injected_reason(model):
    layer_classes = {cls for _, _, cls in _decoder_layer_lists(model)}
    named = ", ".join(sorted(cls.__name__ for cls in layer_classes)) or "its layers"
    guarded = any(cls in layer_classes for cls in _policy_layer_classes())
    why = (f"DeepSpeed's guard against modern decoders skips {named}" if guarded else
           f"DeepSpeed has no inference policy for {named}")
    return (f"{why}: the hybrid engine would inject nothing into {type(model).__name__} and "
            "generate with its own modules through Hugging Face generate (without the engine's "
            "ZeRO-3 gather), yet still build the transformer_inference op (minutes of JIT on a "
            "fresh node) and hold its workspace")


def _policy_layer_classes():
    """The decoder-layer classes DeepSpeed's replace policies name (before its guard)."""
    from deepspeed.module_inject.replace_policy import replace_policies

    classes = []
    for policy in replace_policies:
        policy(None)  # as DeepSpeed does: the constructor sets `_orig_layer_class`
        found = policy._orig_layer_class
        if found is not None:
            classes.extend(found if isinstance(found, list) else [found])
    return classes


def deepspeed_injected_layer_classes(model):
    """{layer class: policy name} of the modules present in `model` that DeepSpeed's hybrid engine
    would replace with inference containers.

    Runs the library's own `DeepSpeedHybridEngine.populate_all_inference_policies` (with its guard)
    on a stand-in engine that holds only `module`; nothing is built or moved.
    """
    import logging

    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine
    from deepspeed.utils import logger as ds_logger

    make_container = object()  # the marker DeepSpeed stores next to each decoder-layer policy
    stand_in = types.SimpleNamespace(module=model, new_inference_container=make_container)
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its "no compatible policy" warning is this check's answer
    try:
        DeepSpeedHybridEngine.populate_all_inference_policies(stand_in)
    except (AttributeError, TypeError):
        # The method needs more of an engine than the stand-in has (a newer DeepSpeed): fall back
        # to the same condition, reproduced.
        return _reproduced_injected_layer_classes(model)
    finally:
        ds_logger.setLevel(level)
    present = {type(m) for m in model.modules()}
    return {cls: entry[-1].__name__ for cls, entry in stand_in.inference_policies.items()
            if entry[0] is make_container and cls in present}


def deepspeed_guard_skips(layer_cls):
    """Does DeepSpeed's modern-decoder guard keep `layer_cls` (in the OPT policy's slot) native?

    Reproduced from deepspeed/runtime/hybrid_engine.py, `DeepSpeedHybridEngine.
    populate_all_inference_policies` (0.19.8): for `HFOPTLayerPolicy` only, skip the policy when the
    layer's forward has a `cache_position` or a `past_key_values` parameter. Every other policy
    (Llama's included) injects unconditionally.
    """
    parameters = inspect.signature(layer_cls.forward).parameters
    return "cache_position" in parameters or "past_key_values" in parameters


def _reproduced_injected_layer_classes(model):
    from deepspeed.module_inject.containers.opt import HFOPTLayerPolicy
    from deepspeed.module_inject.replace_policy import replace_policies

    injected = {}
    for policy in replace_policies:
        policy(None)  # as DeepSpeed does: the constructor sets `_orig_layer_class`
        classes = policy._orig_layer_class
        if classes is None:
            continue
        if policy is HFOPTLayerPolicy and deepspeed_guard_skips(classes):
            continue
        for cls in classes if isinstance(classes, list) else [classes]:
            injected[cls] = policy.__name__
    present = {type(m) for m in model.modules()}
    return {cls: name for cls, name in injected.items() if cls in present}


def _guard_note(layer_cls, policy_name):
    names = [n for n in inspect.signature(layer_cls.forward).parameters if n != "self"]
    if policy_name != "HFOPTLayerPolicy":
        return f"it only looks at OPT layers, and this is {policy_name}"
    cache_names = [n for n in names if "cache" in n or "past" in n]
    return ("it looks for a cache_position / past_key_values parameter; this layer has "
            f"{', '.join(cache_names) or 'neither'}")


def cache_object_parameters(layer_cls):
    """Parameters of `layer_cls.forward` that carry transformers' Cache object rather than the
    legacy per-layer (key, value) tuple: `cache` (5.x), `past_key_values`, `cache_position` (4.38+),
    or a `past_key_value` annotated as a Cache (4.36+). DeepSpeed's injected layer reads and writes
    only its own cache, so with any of these the positions and masks of decode steps go wrong."""
    names = []
    for name, parameter in inspect.signature(layer_cls.forward).parameters.items():
        annotation = parameter.annotation
        annotation = annotation if isinstance(annotation, str) else repr(annotation)
        if name in ("cache", "past_key_values", "cache_position") or (
                name == "past_key_value" and "Cache" in annotation):
            names.append(name)
    return names


def layer_output_contract(layer_cls):
    """TENSOR, TUPLE or UNKNOWN from the return annotation of `layer_cls.forward`."""
    annotation = inspect.signature(layer_cls.forward).return_annotation
    if annotation is inspect.Signature.empty:
        return UNKNOWN
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    origin = getattr(annotation, "__origin__", None)
    if annotation is torch.Tensor or text in ("Tensor", "torch.Tensor", "torch.FloatTensor"):
        return TENSOR
    if annotation is tuple or origin is tuple or str(annotation).lower().startswith(
            ("tuple", "typing.tuple")):
        return TUPLE
    return UNKNOWN


def loop_output_contract(owner_cls, layers_attr="layers"):
    """TENSOR, TUPLE or UNKNOWN: how `owner_cls.forward` uses what each `self.<layers_attr>` layer returns.

    Reads the loop `for <layer> in self.<layers_attr>...:` in the source: `x = layer(...)` followed
    by `x[0]` (or `x = layer(...)[0]`) is the tuple contract; `hidden_states = layer(hidden_states,
    ...)` with no indexing is the tensor contract.
    """
    try:
        source = textwrap.dedent(inspect.getsource(owner_cls.forward))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return UNKNOWN
    verdicts = set()
    for loop in ast.walk(tree):
        if isinstance(loop, ast.For) and _iterates_over(loop.iter, layers_attr):
            layer_names = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
            verdicts |= _uses_of_layer_output(loop, layer_names)
    if len(verdicts) == 1:
        return verdicts.pop()
    return UNKNOWN


def _iterates_over(node, layers_attr):
    """`self.layers`, `self.layers[:n]`, `enumerate(self.layers)`, ..."""
    return any(isinstance(n, ast.Attribute) and n.attr == layers_attr
               and isinstance(n.value, ast.Name) and n.value.id == "self" for n in ast.walk(node))


def _calls_layer(node, layer_names):
    """A call of the loop's layer, directly or through a checkpointing helper (`f(layer.__call__, ...)`)."""
    if not isinstance(node, ast.Call):
        return False
    if isinstance(node.func, ast.Name) and node.func.id in layer_names:
        return True
    return any(isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name)
               and arg.value.id in layer_names for arg in node.args)


def _uses_of_layer_output(loop, layer_names):
    verdicts = set()
    for stmt in ast.walk(loop):
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            continue
        value, target = stmt.value, stmt.targets[0]
        if isinstance(value, ast.Subscript) and _calls_layer(value.value, layer_names):
            verdicts.add(TUPLE)  # x = layer(...)[0]
            continue
        if not _calls_layer(value, layer_names):
            continue
        if isinstance(target, ast.Tuple):
            verdicts.add(TUPLE)  # x, present = layer(...)
        elif isinstance(target, ast.Name):
            indexed = any(isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name)
                          and n.value.id == target.id for n in ast.walk(loop))
            verdicts.add(TUPLE if indexed else TENSOR)
    return verdicts


def _decoder_layer_lists(model):
    """(owner module, attribute name, layer class) of each ModuleList of same-class layers."""
    found = []
    for owner in model.modules():
        for name, child in owner.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) > 0:
                classes = {type(layer) for layer in child}
                if len(classes) == 1:
                    found.append((owner, name, classes.pop()))
    return found


def _load_config(model_config_or_path):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_config_or_path, PretrainedConfig):
        return model_config_or_path
    if isinstance(model_config_or_path, (str, os.PathLike)):
        return AutoConfig.from_pretrained(os.fspath(model_config_or_path))
    raise TypeError(f"expected a PretrainedConfig or a path, got {type(model_config_or_path).__name__}")


def _meta_causal_lm(config):
    """The model class transformers' causal-LM auto mapping gives `config.model_type`, on meta tensors."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if class_name is None:
        raise ValueError(f"no causal-LM class for model_type {config.model_type!r}")
    model_class = getattr(transformers, class_name)
    with torch.device("meta"):
        return model_class(config)


# --------------------------------------------------------------------- the runtime comparison

def greedy_matches_reference(generate_a, generate_b, prompts, attention_mask, max_new_tokens=16):
    """(ok, first_divergence_info): do two generate callables give the same greedy tokens?

    Each callable is called as `fn(input_ids=prompts, attention_mask=attention_mask,
    max_new_tokens=max_new_tokens, do_sample=False)` and returns token ids [B, P + T] (a tensor,
    or an object with `.sequences` as HF `generate` may return); prompts: [B, P]. Only the answers
    (positions P onwards) are compared; an answer that ends early is padded with -1, so the shorter
    one diverges where it stopped. Typical use: `generate_a` = the hybrid engine's generate,
    `generate_b` = the Hugging Face `generate` of the same weights.

    info is None when ok; else {"row", "position" (answer-relative), "a", "b"} (token ids, -1 =
    no token), or {"error": "generate_a raised ..."} when a callable raised.
    """
    answers = []
    for name, generate in (("generate_a", generate_a), ("generate_b", generate_b)):
        try:
            out = generate(input_ids=prompts, attention_mask=attention_mask,
                           max_new_tokens=max_new_tokens, do_sample=False)
        except Exception as err:  # noqa: BLE001 - a crash is a verdict here, reported to the caller
            return False, {"error": f"{name} raised {type(err).__name__}: {err}"}
        out = getattr(out, "sequences", out)
        answers.append(torch.as_tensor(out).detach().to("cpu", torch.long)[:, prompts.shape[1]:])
    answer_a, answer_b = answers
    if answer_a.shape[0] != answer_b.shape[0]:
        return False, {"error": f"batch sizes differ: {answer_a.shape[0]} vs {answer_b.shape[0]}"}
    length = max(answer_a.shape[1], answer_b.shape[1])
    answer_a, answer_b = (torch.nn.functional.pad(x, (0, length - x.shape[1]), value=-1)
                          for x in (answer_a, answer_b))
    differs = answer_a != answer_b
    if not differs.any():
        return True, None
    rows, positions = differs.nonzero(as_tuple=True)
    first = int(torch.argmin(positions * answer_a.shape[0] + rows))  # earliest position, then row
    row, position = int(rows[first]), int(positions[first])
    return False, {"row": row, "position": position, "a": int(answer_a[row, position]),
                   "b": int(answer_b[row, position])}


def runtime_check_message(ok, info):
    """One log line for `greedy_matches_reference`'s result, tagged for scripts/gpu_smoke.py."""
    if ok:
        return f"{VERDICT_TAG} runtime: the hybrid engine's greedy answers match the Hugging Face path"
    if "error" in info:
        return f"{VERDICT_TAG} runtime: mismatch: {info['error']}"
    return (f"{VERDICT_TAG} runtime: mismatch: greedy answers diverge at row {info['row']}, answer "
            f"token {info['position']} ({info['a']} vs {info['b']})")
