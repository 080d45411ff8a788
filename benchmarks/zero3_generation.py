"""ZeRO-3 rollout generation on 2 ranks, the actor gathered once per generate call vs per layer.

The default (utils/zero3_generation.py) against ZeRO-3's per-layer gathering at every decoded token
(`--per_layer_generation_gather`): generation time, parameter fetches, all-gather calls, gathered
bytes and all-reduces per rollout. Prints a table and writes it as markdown and JSON.

    python -m benchmarks.zero3_generation [--quick] [--repeats 3]
                                          [--out benchmarks/output/zero3_generation]

One `deepspeed --num_gpus 2` process on the CPU (DS_ACCELERATOR=cpu, gloo) runs this file as its
worker: a ZeRO-3 actor built like stage 3's (the trained-engine config, its persistence threshold,
fp32), the trainer's ReMax rollout (`PolicyTrainer._decode`: 1 sampled + 1 greedy answer per
prompt in one batched pass), first once per mode as a warm-up, then alternating the two modes
`--repeats` times. Generation time: the slower rank's, median over the repeats. The counts are per
rank and per rollout. A full run (not --quick) replaces its section of benchmarks/RESULTS.md.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script by the launcher (the worker)
    sys.path.insert(0, ROOT)

from benchmarks import table  # noqa: E402
from benchmarks.machine import describe_machine, machine_line  # noqa: E402
from benchmarks.models import ModelSize, parameter_count  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "output", "zero3_generation")
FULL_SIZE = ModelSize()            # 29.7M parameters (hidden 512, 4 layers, vocabulary 32768)
QUICK_SIZE = ModelSize(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4)
MODES = {"gather-once": True, "per-layer": False}   # mode -> gather_once_for_generation
FLAGS = {"gather-once": "(default)", "per-layer": "--per_layer_generation_gather"}
RESULTS_SECTION = "zero3-generation-cpu"


COLUMNS = ["generation_s", "param_fetches", "fetches_per_param", "all_gather_calls",
           "gathered_mib", "all_reduce_calls", "answer_tokens"]
HEADERS = {"generation_s": "generation s", "param_fetches": "parameter fetches",
           "fetches_per_param": "fetches / partitioned parameter",
           "all_gather_calls": "all-gather calls", "gathered_mib": "all-gathered MiB",
           "all_reduce_calls": "all-reduces", "answer_tokens": "answer tokens / rank"}


# --------------------------------------------------------------------------- the counters

class GatherCounter:
    """While open, counts on this rank: the partitioned parameters' fetches (each ZeRO-3
    parameter's own all-gather entry points: `all_gather_coalesced`, which the per-module hooks'
    coordinator calls, and `all_gather`, which GatheredParameters and the external-parameter getter
    call; a call counts the parameters it finds NOT_AVAILABLE), DeepSpeed's all-gather collectives
    at its comm backend (calls and gathered elements) and torch.distributed.all_reduce calls (HF's
    synced_gpus flag, the gather decision)."""

    GATHERS = ("all_gather_into_tensor", "all_gather", "all_gather_coalesced")

    def __init__(self, module):
        self.module = module
        self.counts = {"param_fetches": 0, "all_gather_calls": 0, "all_gather_elements": 0,
                       "all_reduce_calls": 0}

    def __enter__(self):
        import torch
        from deepspeed.comm import comm

        self.params = [p for p in self.module.parameters() if hasattr(p, "ds_id")]
        for p in self.params:
            p.all_gather = self._fetch(p.all_gather, p, "param_list")
            p.all_gather_coalesced = self._fetch(p.all_gather_coalesced, p, "params")
        self.backend = comm.cdb
        for name in self.GATHERS:
            setattr(self.backend, name, self._gather(getattr(self.backend, name)))
        self.all_reduce = torch.distributed.all_reduce
        torch.distributed.all_reduce = self._reduce(self.all_reduce)
        return self

    def __exit__(self, *exc):
        import torch

        for p in self.params:
            p.all_gather, p.all_gather_coalesced = (p.all_gather.original,
                                                    p.all_gather_coalesced.original)
        for name in self.GATHERS:
            delattr(self.backend, name)   # the class's method again
        torch.distributed.all_reduce = self.all_reduce

    def _fetch(self, original, param, list_name):
        def counted(*args, **kwargs):
            listed = kwargs.get(list_name, args[0] if args else None)
            params = [param] if listed is None else list(listed)
            self.counts["param_fetches"] += sum(str(p.ds_status).endswith(".NOT_AVAILABLE")
                                                for p in params)
            return original(*args, **kwargs)
        counted.original = original
        return counted

    def _gather(self, original):
        def counted(*args, **kwargs):
            out = kwargs.get("output_tensor", kwargs.get("tensor_list", kwargs.get(
                "output_tensors", args[0] if args else None)))
            tensors = out if isinstance(out, (list, tuple)) else [out]
            self.counts["all_gather_calls"] += 1
            self.counts["all_gather_elements"] += sum(t.numel() for t in tensors if t is not None)
            return original(*args, **kwargs)
        return counted

    def _reduce(self, original):
        def counted(*args, **kwargs):
            self.counts["all_reduce_calls"] += 1
            return original(*args, **kwargs)
        return counted


# ------------------------------------------------------------------------------ the worker

def worker(opts):
    """On each rank: the actor, the prompts, the rollouts; rank 0 writes --result."""
    sys.path.insert(0, os.path.join(ROOT, "step3_rlhf_finetuning"))
    from types import SimpleNamespace

    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from algorithms import ALGORITHMS, AlgorithmSettings
    from trainer import PolicyTrainer, RolloutSettings
    from utils.ds_utils import get_train_ds_config, set_batch_sizes
    from utils.model.model_utils import disable_dropout_in_config, load_hf_tokenizer
    from utils.utils import all_reduce_max, barrier, init_distributed
    from utils.zero3_generation import partitioned_parameters

    device, rank, world_size = init_distributed(opts.local_rank)
    tokenizer = load_hf_tokenizer(opts.model)
    config = AutoConfig.from_pretrained(opts.model)
    disable_dropout_in_config(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(opts.model, config=config, dtype=torch.float32)
    ds_config = set_batch_sizes(get_train_ds_config(offload=False, stage=3, precision="fp32"),
                                opts.prompts, world_size, 1)
    ds_config["zero_allow_untested_optimizer"] = True
    if opts.persistence_threshold is not None:
        zero = ds_config["zero_optimization"]
        zero["stage3_param_persistence_threshold"] = opts.persistence_threshold
    actor = deepspeed.initialize(model=model, config=ds_config,
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.0))[0]
    models = SimpleNamespace(actor=actor, ref=None, reward=None, critic=None, actor_ema=None,
                             tokenizer=tokenizer)
    base = RolloutSettings(max_answer_seq_len=opts.answer_len, synced_gpus=world_size > 1,
                           fp32_logits=False)
    trainer = PolicyTrainer(models, ALGORITHMS["remax"], AlgorithmSettings(), base)
    generator = torch.Generator().manual_seed(1 + rank)
    prompts = torch.randint(4, len(tokenizer), (opts.prompts, opts.prompt_len),
                            generator=generator).to(device)
    mask = torch.ones_like(prompts)

    def rollout(mode, repeat):
        trainer.rollout = dataclasses.replace(base, gather_once_for_generation=MODES[mode])
        trainer._enter_generation()
        torch.manual_seed(1000 + 10 * repeat + rank)
        partitioned = len(partitioned_parameters(actor.module))
        barrier()
        with GatherCounter(actor.module) as counter:
            start = time.perf_counter()
            sampled, greedy = trainer._decode(prompts, mask, 1, True)
            seconds = time.perf_counter() - start
        slowest = all_reduce_max([seconds])[0]
        return {"generation_s": slowest, **counter.counts, "partitioned_params": partitioned,
                "answer_tokens": (sampled.size(1) + greedy.size(1) - 2 * prompts.size(1))
                * prompts.size(0),
                "answers": [sampled.tolist(), greedy.tolist()]}

    runs = {mode: [] for mode in MODES}
    warm = {mode: rollout(mode, 0) for mode in MODES}          # not measured
    for repeat in range(opts.repeats):
        for mode in MODES:
            runs[mode].append(rollout(mode, repeat + 1))
    if rank == 0:
        same = all(a["answers"] == b["answers"]
                   for a, b in zip(runs["gather-once"], runs["per-layer"]))
        for measurements in runs.values():
            for m in measurements:
                m.pop("answers")
        with open(opts.result, "w") as f:
            json.dump({"runs": runs, "params": sum(1 for _ in actor.module.parameters()),
                       "same_answers": same and warm["gather-once"]["answers"]
                       == warm["per-layer"]["answers"], "world_size": world_size}, f)


# ------------------------------------------------------------------------------ the driver

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="A tiny model (vocabulary 1024, hidden 64), 4 prompts, 8-token "
                             "answers, one repeat: for tests.")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Measured rollouts per mode (default 3, 1 with --quick).")
    parser.add_argument("--prompts", type=int, default=None,
                        help="Prompts per rank (default 8, 4 with --quick); each gets a sampled "
                             "and a greedy answer.")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--persistence_threshold", type=int, default=None,
                        help="ZeRO-3's stage3_param_persistence_threshold: parameters of at most "
                             "this many elements stay gathered (default: stage 3's config, "
                             "100000; with --quick the hidden size, so that the tiny model's "
                             "matrices are partitioned).")
    parser.add_argument("--answer_len", type=int, default=None,
                        help="New tokens per answer (default 64, 8 with --quick).")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--no_results", action="store_true",
                        help="Do not update benchmarks/RESULTS.md even after a full run.")
    # The worker's (set by the driver and the launcher).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    opts.prompts = opts.prompts or (4 if opts.quick else 8)
    opts.answer_len = opts.answer_len or (8 if opts.quick else 64)
    if opts.quick and opts.persistence_threshold is None:
        opts.persistence_threshold = QUICK_SIZE.hidden_size
    return opts


def launch(opts, model_dir, result_path, log_path):
    """The worker on 2 ranks through the deepspeed launcher; returns (returncode, seconds)."""
    from demo.stages import free_port, launcher_env

    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker",
           "--model", model_dir, "--result", result_path, "--repeats", str(opts.repeats),
           "--prompts", str(opts.prompts), "--prompt_len", str(opts.prompt_len),
           "--answer_len", str(opts.answer_len)]
    if opts.persistence_threshold is not None:
        cmd += ["--persistence_threshold", str(opts.persistence_threshold)]
    env = launcher_env(2)
    env["DS_ACCELERATOR"] = "cpu"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=1800)
    return proc.returncode, time.time() - start


def summarize(result):
    """{mode: row}: the median over the repeats of every column."""
    rows = {}
    for mode, measurements in result["runs"].items():
        row = {c: table.median([m[c] for m in measurements]) for c in
               ("generation_s", "param_fetches", "all_gather_calls", "all_reduce_calls",
                "answer_tokens", "partitioned_params")}
        row["gathered_mib"] = table.median([m["all_gather_elements"] * 4 / 2 ** 20
                                            for m in measurements])   # fp32
        row["fetches_per_param"] = table.ratio(row["param_fetches"], row["partitioned_params"])
        rows[mode] = row
    return rows


def markdown_rows(rows):
    lines = ["| gathering | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for mode, row in rows.items():
        cells = [table.format_cell(row.get(c, table.NAN)) for c in COLUMNS]
        lines.append(f"| {mode} `{FLAGS[mode]}` | " + " | ".join(cells) + " |")
    return lines


def report_markdown(opts, size, result, rows, machine, wall, argv):
    once, layer = rows["gather-once"], rows["per-layer"]

    def ratio(column):
        return table.format_number(table.ratio(layer[column], once[column]))

    threshold = ("stage 3's persistence threshold (100000 elements)" if opts.persistence_threshold
                 is None else f"persistence threshold {opts.persistence_threshold} elements")
    return "\n".join([
        "### Rollout generation under ZeRO-3: gathered once vs per layer (cpu, 2 ranks)", "",
        f"Machine: {machine_line(machine)}.", "",
        f"Model: OPT-family, {parameter_count(size) / 1e6:.1f}M parameters (hidden "
        f"{size.hidden_size}, {size.num_layers} layers, vocabulary {size.vocab_size}), random "
        f"weights, fp32, actor ZeRO 3 on 2 ranks (gloo), {threshold}: "
        f"{table.format_number(once['partitioned_params'])} of its {result['params']} parameters "
        "partitioned when a rollout starts, the others kept gathered. "
        f"One ReMax rollout per measurement: {opts.prompts} prompts of {opts.prompt_len} tokens "
        f"per rank, a sampled and a greedy answer each in one pass, up to {opts.answer_len} new "
        f"tokens. Cells: the median over {opts.repeats} rollouts per mode (after one warm-up "
        "each); generation s is the slower rank's; the counts are per rank.", "",
        *markdown_rows(rows), "",
        f"- per-layer / gather-once: generation time {ratio('generation_s')}, parameter fetches "
        f"{ratio('param_fetches')}, all-gathered bytes {ratio('gathered_mib')}.",
        f"- Answers identical in both modes (same seeds): {result['same_answers']}.",
        f"- Command: `{' '.join(['python -m benchmarks.zero3_generation', *argv])}` "
        f"({wall / 60:.1f} min in all).", ""])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.worker:
        worker(opts)
        return 0
    from benchmarks.models import build_models
    from benchmarks.results import update_results

    start = time.time()
    size = QUICK_SIZE if opts.quick else FULL_SIZE
    cache = os.path.join(os.path.dirname(os.path.abspath(opts.out)), "cache")
    actor_dir, _ = build_models(cache, size)
    os.makedirs(opts.out, exist_ok=True)
    result_path = os.path.join(opts.out, "worker.json")
    log_path = os.path.join(opts.out, "worker.log")
    if os.path.exists(result_path):
        os.remove(result_path)
    machine = describe_machine("cpu")
    code, _ = launch(opts, actor_dir, result_path, log_path)
    if code != 0 or not os.path.exists(result_path):
        with open(log_path) as f:
            print(f.read()[-4000:])
        print(f"the worker failed (rc {code}); its log: {log_path}")
        return 1
    with open(result_path) as f:
        result = json.load(f)
    rows = summarize(result)
    markdown = report_markdown(opts, size, result, rows, machine, time.time() - start, argv)
    with open(os.path.join(opts.out, "zero3_generation.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(opts.out, "zero3_generation.json"), "w") as f:
        json.dump(table.json_safe({"machine": machine, "rows": rows, "worker": result,
                                   "size": dataclasses.asdict(size),
                                   "options": {k: v for k, v in vars(opts).items()
                                               if k not in ("worker", "model", "result",
                                                            "local_rank")}}), f, indent=2)
    print("\n" + markdown)
    if not opts.quick and not opts.no_results:
        print(f"updated {update_results(RESULTS_SECTION, markdown)}")
    return 0 if result["same_answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
