"""Force DeepSpeed's hybrid engine on a checkpoint (bypassing the project's check) and compare its
greedy answers with the Hugging Face `generate` of the same weights: what happens, on this GPU, to a
model `utils/hybrid_engine_check.py` says is (in)compatible.

    deepspeed --num_gpus 1 scripts/hybrid_engine_probe.py --model DIR [--precision fp16|bf16]

Prints the static verdict and the runtime one (tagged "[hybrid-engine check]"), then one line
`HYBRID_ENGINE_PROBE {json}` for scripts/gpu_smoke.py. Exit status: 0 when the runtime agrees with the
check (or the check was only cautious), 1 when the check says compatible but the hybrid engine
crashed or generated different tokens, 2 when the probe itself could not run (the engine did not
build, or the Hugging Face reference failed), 3 when the environment could not build DeepSpeed's ops.
"""
import argparse
import json
import os
import re
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROBE_PREFIX = "HYBRID_ENGINE_PROBE "
EXIT_AGREES, EXIT_CHECK_WRONG, EXIT_PROBE_FAILED, EXIT_ENV = 0, 1, 2, 3
# Text of the errors a missing compiler, ninja, CUDA toolkit or package raises while DeepSpeed builds.
ENV_ERROR_MARKERS = ("Error building extension", "ninja", "CUDA_HOME", "MissingCUDAException",
                     "Unable to JIT load", "nvcc", "CUDAMismatchException")
MISSING_PACKAGE = re.compile(r"No module named '(?!utils)")  # a third-party package, not ours
PROMPTS = ["\n\nHuman: Tell me about the moon?\n\nAssistant:",
           "\n\nHuman: Explain the river?\n\nAssistant:",
           "\n\nHuman: Describe a kind and helpful story about the garden?\n\nAssistant:",
           "\n\nHuman: What do you know about music?\n\nAssistant:"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A causal-LM checkpoint directory.")
    parser.add_argument("--precision", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    return parser.parse_args(argv)


def is_env_error(text):
    return any(marker in text for marker in ENV_ERROR_MARKERS) or bool(MISSING_PACKAGE.search(text))


def probe_exit_code(result):
    """EXIT_ENV for a build failure, EXIT_PROBE_FAILED when there is no runtime verdict, and
    EXIT_CHECK_WRONG when a model the check passed crashed or diverged under the kernels."""
    if result.get("env_error"):
        return EXIT_ENV
    if result.get("probe_error"):
        return EXIT_PROBE_FAILED
    if result["static_compatible"] and not result.get("runtime_ok"):
        return EXIT_CHECK_WRONG
    return EXIT_AGREES


def run_probe(args, result):
    """(ok, info): greedy answers of the hybrid engine vs the HF path; records in `result` how many
    layers DeepSpeed injected once the engine is built."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from utils.ds_utils import get_train_ds_config, set_batch_sizes
    from utils.hybrid_engine_check import greedy_matches_reference
    from utils.model.model_utils import load_hf_tokenizer

    deepspeed.init_distributed()
    local_rank = max(args.local_rank, 0)
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    tokenizer = load_hf_tokenizer(args.model)
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = get_train_ds_config(offload=False, stage=args.zero_stage, enable_hybrid_engine=True,
                                 precision=args.precision, max_out_tokens=128)
    set_batch_sizes(config, micro_batch_size=len(PROMPTS), world_size=1, gradient_accumulation_steps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # no FusedAdam build for a probe
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    result["injected_layers"] = len(getattr(engine, "_inference_containers", []))
    # The engine keeps the module's own generate when it swaps its kernel-backed one in.
    hf_generate = getattr(engine, "_generate", None) or engine.module.generate
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    common = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "use_cache": True}

    @torch.no_grad()
    def hybrid(**kwargs):
        engine.eval()  # swaps in the injected inference layers
        return engine.module.generate(**kwargs, **common)

    @torch.no_grad()
    def reference(**kwargs):
        engine.train()  # restores the training modules' forwards
        engine.module.eval()  # ... without dropout
        return hf_generate(**kwargs, **common)

    return greedy_matches_reference(hybrid, reference, batch["input_ids"], batch["attention_mask"],
                                    args.max_new_tokens)


def main(argv=None):
    args = parse_args(argv)
    from utils.hybrid_engine_check import (VERDICT_TAG, hybrid_engine_layer_contract,
                                           runtime_check_message)

    static_ok, static_reason = hybrid_engine_layer_contract(args.model)
    print(f"{VERDICT_TAG} static: {'compatible' if static_ok else 'incompatible'}: {static_reason}",
          flush=True)
    result = {"static_compatible": static_ok, "static_reason": static_reason}
    try:
        ok, info = run_probe(args, result)
        result.update(runtime_ok=ok, info=info)
        error = (info or {}).get("error", "")
        if error and is_env_error(error):
            result["env_error"] = error
        elif error.startswith("generate_b"):
            result["probe_error"] = f"the Hugging Face reference failed: {error}"
        print(runtime_check_message(ok, info), flush=True)
    except Exception as err:  # noqa: BLE001 - reported as the probe's own failure
        traceback.print_exc()
        message = f"{type(err).__name__}: {err}"
        result.update(runtime_ok=False, info={"error": f"building the hybrid engine raised {message}"})
        if is_env_error(traceback.format_exc()):
            result["env_error"] = message
        else:
            result["probe_error"] = f"the hybrid engine did not build: {message}"
        print(f"{VERDICT_TAG} no runtime verdict: building the hybrid engine raised {message}",
              flush=True)
    print(PROBE_PREFIX + json.dumps(result), flush=True)
    return probe_exit_code(result)


if __name__ == "__main__":
    sys.exit(main())
