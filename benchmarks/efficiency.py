"""What each efficiency feature of stage 3 buys: ReMax with every feature on, with all of them off
(the faithful path) and with each one off alone (the ablation), on two setups; times, peak memory
(whole run and per phase), ratios to the faithful path, the decoding floor and the targets.

    python -m benchmarks.efficiency [--quick] [--repeats 2] [--setups uniform varied]
                                    [--out benchmarks/output/efficiency]

Setups: `uniform`, the shapes of the TRL comparison (8 prompts of about 30 tokens, answers up to
64); `varied`, prompts of 16-256 tokens in hh-rlhf's proportions, answers up to 128. Both use
the algorithm benchmark's models (vocabulary 32768) and runs (benchmarks/algorithms.py: one
process per run, world size 1, runs alternated). A full run (both setups, not --quick) replaces
its section of benchmarks/RESULTS.md.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from benchmarks import table
from benchmarks.algorithms import FULL_SIZE, QUICK_SIZE, Bench, measure, warm_up
from benchmarks.floor import DecodeShape, decode_floor_seconds
from benchmarks.machine import describe_machine, machine_line
from benchmarks.models import (VARIED_PROMPT_LENGTHS, build_data, build_models, build_varied_data,
                               parameter_count)
from benchmarks.results import footer_lines, update_results
from benchmarks.stage3_run import Shape
from benchmarks.variants import ABLATIONS, FAITHFUL

DEFAULT_OUT = os.path.join("benchmarks", "output", "efficiency")
TWO_PASS = "remax-no-one-generation-pass"
# TRL 1.12 RLOOTrainer, k = 2, on the uniform setup's shapes (a 34M OPT policy and reward model,
# fp32, one process, 2-core CPU): the measurement. TRL is not a dependency; not re-run.
TRL_RLOO = {"e2e_s": 6.41, "peak_memory_mib": 1921.0}


@dataclass(frozen=True)
class Setup:
    shape: Shape
    data: Callable        # (cache dir, actor dir) -> data dir
    rows: Tuple[str, ...]
    description: str


def setups(quick):
    uniform = Shape()
    varied = Shape(max_prompt_seq_len=256, max_answer_seq_len=128)
    if quick:
        uniform = dataclasses.replace(uniform, max_answer_seq_len=16, steps=2)
        varied = dataclasses.replace(varied, max_answer_seq_len=16, steps=2)
    lengths = ", ".join(f"{n} ({share:.0%})" for n, share in VARIED_PROMPT_LENGTHS)
    return {
        "uniform": Setup(uniform, lambda cache, actor: build_data(cache), ("remax", FAITHFUL),
                         f"{uniform.prompts_per_step} prompts per update of about 30 tokens (at "
                         f"most {uniform.max_prompt_seq_len}), answers up to "
                         f"{uniform.max_answer_seq_len} tokens: the TRL comparison's shapes"),
        "varied": Setup(varied, build_varied_data,
                        ("remax", FAITHFUL) if quick else ("remax", FAITHFUL, *ABLATIONS),
                        f"{varied.prompts_per_step} prompts per update drawn from prompts of "
                        f"{lengths} tokens, padded to at most {varied.max_prompt_seq_len}; answers "
                        f"up to {varied.max_answer_seq_len} tokens"),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="A tiny model, 16-token answers, ReMax and the faithful path only, "
                             "one 2-update run each: for tests.")
    parser.add_argument("--repeats", type=int, default=None, help="Runs per row (default 2, 1 with --quick).")
    parser.add_argument("--setups", nargs="+", default=["uniform", "varied"],
                        choices=["uniform", "varied"])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--no_results", action="store_true",
                        help="Do not update benchmarks/RESULTS.md even after a full run.")
    opts = parser.parse_args(argv)
    opts.repeats = opts.repeats or (1 if opts.quick else 2)
    opts.device, opts.stage3_main = "cpu", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "step3_rlhf_finetuning", "main.py")
    return opts


def measure_setup(opts, name, setup, size):
    """({row: combined row}, {row: [run summaries]}, {row: failure}) of one setup."""
    setup_opts = options(opts, out=os.path.join(opts.out, name), algos=list(setup.rows))
    bench = Bench(setup_opts, size, setup.shape,
                  data=lambda cache: setup.data(cache, build_models(cache, size)[0]))
    runs, failures = measure(setup_opts, bench, tag=f"{name} ")
    rows = {row: table.combine_runs(runs[row]) for row in setup.rows}
    add_ratios(rows)
    return rows, runs, failures


def options(opts, **changes):
    return argparse.Namespace(**{**vars(opts), **changes})


RATIOS = (("e2e_vs_faithful", "e2e_s"), ("memory_vs_faithful", table.MEMORY_COLUMN),
          ("experience_memory_vs_faithful", "experience_peak_mib"),
          ("experience_rise_vs_faithful", "experience_rise_mib"),
          ("generation_vs_faithful", "generation_s"))
table.HEADERS.update({"e2e_vs_faithful": "e2e / faithful", "memory_vs_faithful": "memory / faithful",
                      "experience_memory_vs_faithful": "experience peak / faithful",
                      "experience_rise_vs_faithful": "experience rise / faithful",
                      "generation_vs_faithful": "generation / faithful"})


def add_ratios(rows):
    base = rows.get(FAITHFUL, {})
    for row in rows.values():
        for column, source in RATIOS:
            row[column] = table.ratio(row.get(source, table.NAN), base.get(source, table.NAN))


def target(label, value, limit):
    verdict = "n/a" if not table.is_finite(value) else "met" if value <= limit else "missed"
    return f"{label} = {table.format_number(value)} (target <= {limit}: {verdict})"


def floor_lines(opts, rows, setup, size):
    """Generation time against the decoding floor (benchmarks/floor.py) on `setup`'s shapes: one
    pass of sampled + greedy rows, and the faithful path's two passes."""
    shape, prompts = setup.shape, setup.shape.prompts_per_step
    torch.set_num_threads(os.cpu_count() or 1)   # as the runs (OMP_NUM_THREADS = all cores)
    one = decode_floor_seconds(size, DecodeShape(2 * prompts, shape.max_prompt_seq_len,
                                                 shape.max_answer_seq_len))
    two = 2 * decode_floor_seconds(size, DecodeShape(prompts, shape.max_prompt_seq_len,
                                                     shape.max_answer_seq_len))
    lines = []
    for row, floor, what in (("remax", one, f"one pass of {2 * prompts} rows"),
                             (FAITHFUL, two, f"two passes of {prompts} rows")):
        generation = rows.get(row, {}).get("generation_s", table.NAN)
        lines.append(f"Decoding floor ({what}, prompts of {shape.max_prompt_seq_len} tokens, "
                     f"{shape.max_answer_seq_len} new tokens): {table.format_number(floor)} s; "
                     f"{row} generation {table.format_number(generation)} s = "
                     f"{table.format_number(table.ratio(generation, floor))} x the floor")
    return lines, {"one_pass_s": one, "two_passes_s": two}


def target_lines(name, rows, quick=False):
    remax = rows.get("remax", {})
    if name == "uniform" and quick:
        return []
    if name == "uniform":
        return [target("remax e2e / TRL RLOO k=2", table.ratio(remax.get("e2e_s"), TRL_RLOO["e2e_s"]),
                       0.6),
                target("remax peak memory / TRL RLOO k=2",
                       table.ratio(remax.get(table.MEMORY_COLUMN), TRL_RLOO["peak_memory_mib"]), 1.0)]
    two_pass = rows.get(TWO_PASS, {}).get("generation_s", table.NAN)
    return [target("remax e2e / faithful", remax.get("e2e_vs_faithful", table.NAN), 0.5),
            target(f"remax generation / {TWO_PASS}",
                   table.ratio(remax.get("generation_s", table.NAN), two_pass), 0.8),
            target("remax experience peak / faithful",
                   remax.get("experience_memory_vs_faithful", table.NAN), 0.5),
            target("remax experience rise (above the memory in use when it began) / faithful",
                   remax.get("experience_rise_vs_faithful", table.NAN), 0.5),
            target("remax whole-step peak / faithful", remax.get("memory_vs_faithful", table.NAN),
                   0.7)]


COLUMNS = ["generation_s", "experience_s", "training_s", "e2e_s", table.MEMORY_COLUMN,
           "experience_peak_mib", "experience_rise_mib", "training_peak_mib", "training_rise_mib",
           "e2e_vs_faithful", "generation_vs_faithful", "memory_vs_faithful",
           "experience_memory_vs_faithful", "experience_rise_vs_faithful"]


def section(name, setup, rows, runs, failures, extra_lines, opts):
    measured = ", ".join(f"{row}: {r['measured_steps']}" for row, r in rows.items())
    labels = {row: f"{row} ({ABLATIONS[row]} off)" if row in ABLATIONS else row for row in rows}
    lines = [f"#### Setup `{name}`: {setup.description}", "",
             f"{opts.repeats} runs per row of {setup.shape.steps} updates ({measured} updates "
             "measured).", "",
             table.markdown_table({labels[r]: v for r, v in rows.items()}, COLUMNS), ""]
    lines += [f"- {line}" for line in target_lines(name, rows, opts.quick) + extra_lines]
    lines += [f"- FAILED {row}: {message}" for row, message in failures.items()]
    return lines


def main(argv=None):
    start = time.time()
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    size = QUICK_SIZE if opts.quick else FULL_SIZE
    chosen = {name: setup for name, setup in setups(opts.quick).items() if name in opts.setups}
    machine = describe_machine("cpu")
    report, body, all_failures = {"machine": machine}, [], {}
    first = True
    for name, setup in chosen.items():
        rows, runs, failures = measure_setup(opts, name, setup, size) if not first else \
            warm_and_measure(opts, name, setup, size, report)
        first = False
        extra_lines = []
        if name == "uniform":
            extra_lines, report["floor"] = floor_lines(opts, rows, setup, size)
        if name == "uniform" and not opts.quick:   # TRL's figures are for the full model
            extra_lines.append(f"TRL RLOO k=2 (the issue's measurement on these shapes, not re-run "
                               f"here): {TRL_RLOO['e2e_s']} s per update, "
                               f"{TRL_RLOO['peak_memory_mib']:.0f} MiB peak")
        body += section(name, setup, rows, runs, failures, extra_lines, opts) + [""]
        report[name] = {"rows": rows, "runs": runs, "failures": failures,
                        "shape": dataclasses.asdict(setup.shape)}
        all_failures.update({f"{name}/{row}": message for row, message in failures.items()})
    wall = time.time() - start
    lines = ["### Stage 3 efficiency: each feature on, off, and off alone (cpu)", "",
             f"Machine: {machine_line(machine)}.", "",
             f"Model: OPT-family, {parameter_count(size) / 1e6:.1f}M parameters (hidden "
             f"{size.hidden_size}, {size.num_layers} layers, vocabulary {size.vocab_size}), random "
             "weights, fp32; reward model of the same size. Actor ZeRO 2, reference/reward ZeRO 0, "
             "world size 1, ReMax. `faithful`: every efficiency flag off "
             "(the original's procedure). Peak memory: the training process's peak resident set; "
             "experience / training peak: the largest over the measured updates of that phase's "
             "peak resident set (it includes memory the allocator kept from earlier phases). A "
             "cell is the median over runs of the median over each run's updates after the first.",
             "", *body, *footer_lines("benchmarks.efficiency", argv, {}, wall)]
    markdown = "\n".join(lines) + "\n"
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "efficiency.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(opts.out, "efficiency.json"), "w") as f:
        json.dump(table.json_safe(report), f, indent=2)
    print("\n" + markdown)
    if not opts.quick and not opts.no_results and set(opts.setups) == {"uniform", "varied"}:
        print(f"updated {update_results('efficiency-cpu', markdown)}")
    return 1 if all_failures else 0


def warm_and_measure(opts, name, setup, size, report):
    """The first setup's measurement, after one warm-up run that pays the JIT builds."""
    if not opts.quick:
        warm_opts = options(opts, out=os.path.join(opts.out, "warm-up"), algos=["remax"])
        report["floor_mib"] = warm_up(warm_opts, Bench(warm_opts, size, setup.shape))
    return measure_setup(opts, name, setup, size)


if __name__ == "__main__":
    sys.exit(main())
