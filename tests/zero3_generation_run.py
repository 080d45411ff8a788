"""Launched by test_zero3_generation.py on 2 ranks: a ZeRO-3 actor's rollout generation with its
parameters gathered once per generate call (utils/zero3_generation.py) against ZeRO-3's per-layer
gathering, against the memory check's fallback (free memory forced to 1 byte) and against a
control that generates nothing.

For each mode a fresh ZeRO-3 actor (the same weights) runs two no-grad forwards first, after which
ZeRO-3's persistent small parameters are gathered and the others partitioned; then the trainer's
`_generate` greedily, sampled (the same seed) and `_decode` (2 samples + the greedy baseline in
one pass), counting the partitioned parameters' fetches, DeepSpeed's all-gather calls and
gathered elements and the all-reduces (GatherCounter of benchmarks/zero3_generation.py). Rank 1's
answers are shorter than rank 0's, so without synced_gpus the ranks stop at different steps. After
the rollout every module's hooks and every parameter's ZeRO status must be as before, also after
an exception inside the gathered block; then one training step (forward, backward, step, forward)
runs on the same answers in every mode, after which ZeRO-3's state, the losses and the gradients
must be the control's. Each rank writes <out>/rank_<r>.json.

    deepspeed --num_gpus 2 tests/zero3_generation_run.py --model DIR --out DIR
"""
import json
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "step3_rlhf_finetuning")]

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from algorithms import ALGORITHMS, AlgorithmSettings  # noqa: E402
from benchmarks.zero3_generation import GatherCounter  # noqa: E402
from trainer import PolicyTrainer, RolloutSettings  # noqa: E402
from utils import zero3_generation  # noqa: E402
from utils.ds_utils import get_train_ds_config  # noqa: E402
from utils.model.model_utils import unwrap  # noqa: E402
from zero3_chunked_scores import start_worker  # noqa: E402

ROWS, PROMPT = 3, 6
MODES = ("per_layer", "gather_once", "fallback", "control")


def hook_snapshot(module):
    """Every module's hook dicts: (module index, dict name, ((hook id, id(hook fn)), ...))."""
    names = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks")
    return [(i, name, tuple((key, id(value)) for key, value in getattr(m, name).items()))
            for i, m in enumerate(module.modules()) for name in names]


def param_snapshot(module):
    return [(p.ds_id, str(p.ds_status), sorted(p.ds_active_sub_modules))
            for p in module.parameters()]


def zero3_state(module):
    """What another engine of the same model can be compared on (ds_ids differ between engines)."""
    return [(name, str(p.ds_status), len(p.ds_active_sub_modules))
            for name, p in module.named_parameters()]


def build_actor(path, config, hidden):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, config=config)
    ds = get_train_ds_config(offload=False, stage=3)
    # Parameters of at most `hidden` elements (biases, layer norms) stay gathered (ZeRO-3's
    # persistent ones); the matrices are partitioned.
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = hidden
    ds["train_micro_batch_size_per_gpu"] = ROWS * 2
    ds["train_batch_size"] = ROWS * 2 * torch.distributed.get_world_size()
    ds["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=ds)[0]


def rollout(trainer, prompts, mask, rank):
    trainer._enter_generation()
    outputs, counts = {}, {}
    calls = (("greedy", lambda: trainer._generate(prompts, mask, do_sample=False)),
             ("sampled", lambda: trainer._generate(prompts, mask, do_sample=True)),
             ("decode", lambda: torch.cat(trainer._decode(prompts, mask, 2, True))))
    for i, (name, call) in enumerate(calls):
        torch.manual_seed(100 + 10 * rank + i)
        with GatherCounter(unwrap(trainer.actor)) as c:
            outputs[name] = call()
        counts[name] = c.counts
    return outputs, counts


def main():
    opts, device, rank, tokenizer, config = start_worker()
    generator = torch.Generator().manual_seed(7 + rank)
    prompts = torch.randint(4, config.vocab_size, (ROWS, PROMPT), generator=generator)
    mask = torch.ones_like(prompts)
    prompts[0, :2], mask[0, :2] = tokenizer.pad_token_id, 0        # one left-padded row
    prompts, mask = prompts.to(device), mask.to(device)
    answer_len = 10 if rank == 0 else 5                             # ranks stop at different steps

    report, reference = {}, {}
    original_free = zero3_generation.free_memory_bytes
    for mode in MODES:
        actor = build_actor(opts.model, config, config.hidden_size)
        module = actor.module
        models = SimpleNamespace(actor=actor, ref=None, reward=None, critic=None, actor_ema=None,
                                 tokenizer=tokenizer)
        trainer = PolicyTrainer(models, ALGORITHMS["remax"], AlgorithmSettings(), RolloutSettings(
            max_answer_seq_len=answer_len, num_samples_per_prompt=2, synced_gpus=True,
            gather_once_for_generation=mode != "per_layer", fp32_logits=False))
        actor.eval()
        with torch.no_grad():   # ZeRO-3 records its trace; persistent parameters stay gathered
            for _ in range(2):
                actor(prompts, attention_mask=mask, use_cache=False)
        partitioned = zero3_generation.partitioned_parameters(module)
        hooks_before, params_before = hook_snapshot(module), param_snapshot(module)
        entry = {"params": len(params_before), "partitioned_at_entry": len(partitioned),
                 "partitioned_elements": sum(int(p.ds_numel) for p in partitioned)}
        if mode != "control":
            zero3_generation.free_memory_bytes = (lambda device_name=None: 1) \
                if mode == "fallback" else original_free
            outputs, entry["counts"] = rollout(trainer, prompts, mask, rank)
            zero3_generation.free_memory_bytes = original_free
            entry["hooks_restored"] = hook_snapshot(module) == hooks_before
            entry["statuses_restored"] = param_snapshot(module) == params_before
            entry["answer_lengths"] = {k: v.size(1) - PROMPT for k, v in outputs.items()}
            if mode == "per_layer":
                reference["outputs"] = outputs
            else:
                entry["same_answers"] = {k: torch.equal(v, reference["outputs"][k])
                                         for k, v in outputs.items()}

            # An exception inside the gathered block restores everything too.
            inside = None
            try:
                with zero3_generation.generation_parameters(actor) as gathered:
                    inside = (gathered, all(str(p.ds_status).endswith(".AVAILABLE")
                                            for p in module.parameters()))
                    raise KeyError("inside")
            except KeyError:
                pass
            entry["gathered_inside"] = inside
            entry["restored_after_error"] = (hook_snapshot(module) == hooks_before
                                             and param_snapshot(module) == params_before)

        # Training afterwards: one step on the same answers in every mode, then the loss again.
        trainer._enter_scoring()
        actor.train()
        seq = reference["outputs"]["sampled"]
        loss = actor(seq, attention_mask=torch.ones_like(seq), labels=seq, use_cache=False).loss
        actor.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in module.named_parameters()}
        actor.step()
        with torch.no_grad():
            loss_after = actor(seq, attention_mask=torch.ones_like(seq), labels=seq,
                               use_cache=False).loss.item()
        state = {"losses": (loss.item(), loss_after), "grads": grads,
                 "params": zero3_state(module)}
        entry["losses"] = state["losses"]
        report[mode] = entry
        reference[mode] = state
        del trainer, actor, module
    control = reference["control"]
    for mode in MODES[:-1]:
        state = reference[mode]
        report[mode]["same_losses_as_control"] = state["losses"] == control["losses"]
        report[mode]["grad_diff_to_control"] = max(
            (g - control["grads"][n]).abs().max().item() for n, g in state["grads"].items())
        report[mode]["zero3_state_after_training_as_control"] = state["params"] == control["params"]
    with open(os.path.join(opts.out, f"rank_{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
