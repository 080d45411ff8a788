"""Speed and memory of one stage-3 update for ReMax, PPO (1 and 4 epochs), RLOO and GRPO on the
same models, data, batch and lengths; prints a table and writes it as markdown and JSON.

    python -m benchmarks.algorithms [--quick] [--repeats 2] [--algos remax ppo-1ep ...]
                                    [--device cpu|cuda] [--out benchmarks/output/algorithms]

Every run is its own process (`python step3_rlhf_finetuning/main.py`, world size 1), a few
updates long; runs alternate A B C D E, A B C D E, ... so drift of the machine hits every row. A
full run (every row, not --quick) also replaces its section of benchmarks/RESULTS.md.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from benchmarks import table
from benchmarks.batch_search import format_max_batch, largest_fitting_batch
from benchmarks.machine import describe_machine, machine_line
from benchmarks.models import ModelSize, build_data, build_models, parameter_count
from benchmarks.results import footer_lines, update_results
from benchmarks.stage3_run import (STAGE3_MAIN, Shape, log_tail, ran_out_of_memory, run_process,
                                   stage3_args)
from benchmarks.variants import ALGORITHM_ROWS, REFERENCE, VARIANTS, variant_flags
from utils.training import read_metrics

DEFAULT_OUT = os.path.join("benchmarks", "output", "algorithms")
FULL_SIZE = ModelSize()                      # 29.7M parameters, vocabulary 32768
QUICK_SIZE = ModelSize(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4)
WARM_UP_SIZE = QUICK_SIZE
TARGETS = (("memory_vs_ppo", 0.7), ("e2e_vs_ppo", 0.75))   # ReMax against PPO, 1 epoch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="A tiny model (vocabulary 1024), 16-token answers, one 2-update "
                             "run per row: for tests.")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Runs per row (default 2, 1 with --quick).")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"Updates per run (default {Shape.steps}, 2 with --quick); the first "
                             "is a warm-up and not measured.")
    parser.add_argument("--algos", nargs="+", default=list(ALGORITHM_ROWS),
                        choices=list(VARIANTS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--zero_stage", type=int, default=Shape.trained_zero_stage,
                        help="ZeRO stage of the trained models (actor, critic).")
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
        parser.add_argument(f"--{field}", type=int, default=None,
                            help=f"Model {field} (default {getattr(FULL_SIZE, field)}).")
    parser.add_argument("--stage3_main", default=STAGE3_MAIN,
                        help="The stage-3 main.py to run (another checkout's, to compare).")
    parser.add_argument("--no_results", action="store_true",
                        help="Do not update benchmarks/RESULTS.md even after a full run.")
    opts = parser.parse_args(argv)
    if opts.steps is not None and opts.steps < 2:
        parser.error("--steps must be at least 2 (the first update is not measured)")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    opts.repeats = opts.repeats or (1 if opts.quick else 2)
    return opts


def run_shape(opts):
    """The full shape, or for --quick answers of 16 tokens and 2 updates per run."""
    shape = Shape(trained_zero_stage=opts.zero_stage)
    if opts.quick:
        shape = dataclasses.replace(shape, max_answer_seq_len=16, steps=2)
    return shape if opts.steps is None else dataclasses.replace(shape, steps=opts.steps)


def model_size(opts):
    base = QUICK_SIZE if opts.quick else FULL_SIZE
    changes = {f: getattr(opts, f) for f in ("vocab_size", "hidden_size", "num_layers",
                                             "num_heads") if getattr(opts, f) is not None}
    return dataclasses.replace(base, **changes)


class Bench:
    """The shared models and data, and one measured run of a row."""

    def __init__(self, opts, size, shape, data=None):
        """`data`: (cache dir -> data dir) of the prompts, default build_data's ~30-token ones."""
        self.opts, self.size, self.shape = opts, size, shape
        self.cache = os.path.join(os.path.dirname(os.path.abspath(opts.out)), "cache")
        self.actor, self.reward = build_models(self.cache, size)
        self.data = (data or build_data)(self.cache)
        os.makedirs(opts.out, exist_ok=True)
        self.runs_dir = os.path.join(opts.out, "runs")
        shutil.rmtree(self.runs_dir, ignore_errors=True)
        self.data_cache = os.path.join(self.runs_dir, "data_cache")

    def run(self, label, name, shape=None, batch_size=None, models=None):
        """(summary or None, process result) of one run; checkpoints are deleted afterwards."""
        shape = shape or self.shape
        actor, reward = models or (self.actor, self.reward)
        out = os.path.join(self.runs_dir, label)
        args = stage3_args(shape, actor, reward, self.data, self.data_cache, out,
                           variant_flags(name, shape.trained_zero_stage), batch_size=batch_size)
        result = run_process(args, out + ".log", self.opts.device, self.opts.stage3_main)
        drop_checkpoints(out)
        if result.returncode != 0:
            return None, result
        records = read_metrics(out)
        peak = result.peak_rss_mib if self.opts.device == "cpu" else result.peak_gpu_mib
        if self.opts.device == "cpu":  # the per-phase peaks reset the kernel's; the run logs its own
            peak = max([peak] + [r["train/process_peak_mib"] for r in records
                                 if table.is_finite(r.get("train/process_peak_mib"))])
        summary = table.run_summary(records, peak)
        summary["wall_seconds"] = result.wall_seconds
        summary["cores_used"] = result.cpu_seconds / max(result.wall_seconds, 1e-9)
        return summary, result


def drop_checkpoints(run_dir):
    """Delete the weights a run saved (only its metrics and log are read)."""
    for folder, _, files in os.walk(run_dir):
        for name in files:
            if name.endswith((".safetensors", ".bin", ".pt")):
                os.remove(os.path.join(folder, name))


def warm_up(opts, bench):
    """One short run on a tiny model: pays DeepSpeed's one-time JIT builds (whose compiler would
    otherwise count in a measured peak RSS); returns that process's peak RSS, the floor of imports
    and runtime that every row carries."""
    print(f"warm-up: {opts.algos[0]} on a {parameter_count(WARM_UP_SIZE) / 1e6:.1f}M-parameter "
          "model", flush=True)
    summary, result = bench.run("warm-up", opts.algos[0], dataclasses.replace(bench.shape, steps=2),
                                models=build_models(bench.cache, WARM_UP_SIZE))
    if summary is None:
        print(f"  warm-up FAILED (exit {result.returncode}):\n{log_tail(result.log_path, 1500)}",
              flush=True)
        return table.NAN
    return summary[table.MEMORY_COLUMN]   # its peak, with the ones its phase windows reset


def measure(opts, bench, tag=""):
    """Alternating runs of the rows `opts.algos` -> ({name: [run summaries]}, {name: failure
    message}); `tag` prefixes the progress lines."""
    runs, failures = {name: [] for name in opts.algos}, {}
    order = table.alternating_order(opts.algos, opts.repeats)
    for index, (repeat, name) in enumerate(order):
        if name in failures:
            continue
        print(f"[{tag}{index + 1}/{len(order)}] {name} (run {repeat + 1}/{opts.repeats})",
              flush=True)
        summary, result = bench.run(f"{repeat}-{name}", name)
        if summary is None:
            failures[name] = f"exit {result.returncode}, log {result.log_path}"
            print(f"  FAILED ({failures[name]}):\n{log_tail(result.log_path, 1500)}", flush=True)
            continue
        runs[name].append(summary)
        print(f"  e2e {table.format_number(summary['e2e_s'])} s/update, generation "
              f"{table.format_number(summary['generation_s'])} s, peak "
              f"{table.format_number(summary[table.MEMORY_COLUMN])} MiB, run "
              f"{summary['wall_seconds']:.0f} s", flush=True)
    return runs, failures


def add_max_batches(rows, bench, names):
    """GPU only: the largest per-device prompt batch each row fits (at most 3 probes from twice
    the benchmark's batch, one update each). A failure that is not an OOM stops the benchmark."""
    probe_shape = dataclasses.replace(bench.shape, steps=1)
    for name in names:
        def fits(batch, name=name):
            summary, result = bench.run(f"probe-{name}-{batch}", name, probe_shape, batch)
            if summary is None and not ran_out_of_memory(result.log_path):
                raise RuntimeError(f"batch probe {name} at {batch} failed without an OOM:\n"
                                   f"{log_tail(result.log_path)}")
            return summary is not None
        first_probe = 2 * bench.shape.prompts_per_step
        rows[name]["max_batch"] = format_max_batch(*largest_fitting_batch(fits, first_probe))
    if not all(table.is_finite(row[table.MEMORY_COLUMN]) for row in rows.values()):
        print("WARNING: some runs wrote no peak GPU memory (scripts/peak_memory.py's JSON next to "
              "their log): those cells are NaN", file=sys.stderr)


def report_markdown(opts, argv, size, shape, rows, runs, failures, extra):
    columns = [c for c, _ in table.STEP_COLUMNS] + [table.MEMORY_COLUMN]
    columns += ["max_batch"] if opts.device == "cuda" else []
    columns += [c for c, _ in table.RATIO_COLUMNS]
    measured = ", ".join(f"{name}: {row['measured_steps']}" for name, row in rows.items())
    memory = ("peak RSS of the training process (rusage of the child)" if opts.device == "cpu"
              else "torch.cuda.max_memory_allocated of the training process at its exit "
                   "(scripts/peak_memory.py)")
    lines = [f"### Stage 3, one update per algorithm ({opts.device})", "",
             f"Machine: {machine_line(extra['machine'])}.", "",
             f"Model: OPT-family, {parameter_count(size) / 1e6:.1f}M parameters (hidden "
             f"{size.hidden_size}, {size.num_layers} layers, vocabulary {size.vocab_size}), random "
             f"weights, {'fp32' if opts.device == 'cpu' else 'the accelerator default precision'}; "
             f"reward model and PPO critic of the same size. Actor/critic ZeRO "
             f"{shape.trained_zero_stage}, reference/reward ZeRO {shape.frozen_zero_stage}, world "
             f"size 1. Each update: {shape.prompts_per_step} prompts of about 30 tokens (at most "
             f"{shape.max_prompt_seq_len}), answers up to {shape.max_answer_seq_len} tokens, K "
             f"answers per prompt as in the row name (ReMax adds one greedy answer).", "",
             f"{opts.repeats} runs per row of {shape.steps} updates, alternated; a cell is the "
             f"median over runs of the median over each run's updates after the first "
             f"({measured} updates measured). Peak memory: {memory}. Ratios are to "
             f"{REFERENCE}.", "",
             table.markdown_table(rows, columns), ""]
    if "remax" in rows:
        lines += [f"- {line}" for line in table.target_lines(rows, "remax", REFERENCE, TARGETS)]
    if opts.device == "cpu" and table.is_finite(extra.get("floor_mib", table.NAN)):
        tiny_millions = parameter_count(WARM_UP_SIZE) / 1e6
        lines.append(f"- Floor: the warm-up process with a {tiny_millions:.1f}M-parameter model "
                     f"peaked at {extra['floor_mib']:.0f} MiB (imports, runtime).")
    cores = [run["cores_used"] for summaries in runs.values() for run in summaries]
    if opts.device == "cpu" and cores:
        load = ", ".join(f"{x:.1f}" for x in extra["load_average_end"])
        lines.append(f"- CPU: the training processes kept {table.median(cores):.2f} cores busy "
                     f"(median over runs, least {min(cores):.2f}; "
                     f"{extra['machine']['usable_cores']} usable; load average at the end "
                     f"{load}): a run far below the others shared the machine, and its timings "
                     "are off.")
    ratio_columns = [c for c, _ in table.RATIO_COLUMNS]
    if REFERENCE not in runs or not runs[REFERENCE]:
        lines.append(f"- Ratios: NaN, no {REFERENCE} run to compare with.")
    missing = sorted({c for r in rows.values() for c in columns if c in r and c not in
                      ratio_columns and not isinstance(r[c], str) and not table.is_finite(r[c])})
    if missing:
        lines.append(f"- NaN: not produced ({', '.join(missing)}): the metric is not logged by "
                     "stage 3, or the row failed.")
    lines += footer_lines("benchmarks.algorithms", argv, failures, extra["wall_seconds"])
    return "\n".join(lines) + "\n"


def write_report(opts, markdown, report):
    with open(os.path.join(opts.out, "algorithms.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(opts.out, "algorithms.json"), "w") as f:
        json.dump(table.json_safe(report), f, indent=2)
    print("\n" + markdown)
    if not opts.quick and not opts.no_results and set(opts.algos) == set(ALGORITHM_ROWS):
        print(f"updated {update_results(f'algorithms-{opts.device}', markdown)}")
    print(f"wrote {os.path.join(opts.out, 'algorithms.md')} and algorithms.json")


def main(argv=None):
    start = time.time()
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    size, shape = model_size(opts), run_shape(opts)
    extra = {"machine": describe_machine(opts.device)}
    bench = Bench(opts, size, shape)
    if not opts.quick:
        extra["floor_mib"] = warm_up(opts, bench)
    runs, failures = measure(opts, bench)
    rows = {name: table.combine_runs(runs[name]) for name in opts.algos}
    table.add_ratios(rows, REFERENCE)
    if opts.device == "cuda":
        add_max_batches(rows, bench, [name for name in opts.algos if runs[name]])
    extra["wall_seconds"] = time.time() - start
    extra["load_average_end"] = os.getloadavg()
    write_report(opts, report_markdown(opts, argv, size, shape, rows, runs, failures, extra),
                 {**extra, "model": dataclasses.asdict(size), "parameters": parameter_count(size),
                  "shape": dataclasses.asdict(shape), "repeats": opts.repeats,
                  "order": table.alternating_order(opts.algos, opts.repeats), "rows": rows,
                  "runs": runs, "failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
