"""Quality, the paper's other claim in miniature: on the demo's task, ReMax, PPO, RLOO and GRPO from
the same SFT and reward model, the same number of updates, 3 seeds; eval reward and the rule
metric against updates and against wall time, as one table and one plot.

    python -m benchmarks.quality [--quick] [--seeds 1 2 3] [--algos remax ppo-1ep rloo-k2 grpo-k2]
                                 [--out benchmarks/output/quality]

Stages 1 and 2 run once per seed, with the demo's settings and functions (demo/config.py); stage 3
runs once per algorithm and seed with the demo's ReMax settings plus the row's flags
(benchmarks/variants.py), through the deepspeed launcher as in the demo. A full run (3 seeds, every
algorithm, not --quick) also replaces its section of benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import shutil
import sys
import time

from benchmarks.machine import describe_machine, machine_line
from benchmarks.quality_report import plot_quality, quality_table, run_curve
from benchmarks.results import RESULTS_PATH, footer_lines, update_results
from benchmarks.table import json_safe
from benchmarks.variants import VARIANTS, variant_flags
from demo.build import build_data, build_model
from demo.config import DemoConfig, quick_config, remax_args, reward_args, sft_args
from demo.stages import StageFailed, run_stage

ALGOS = ("remax", "ppo-1ep", "rloo-k2", "grpo-k2")
QUICK_ALGOS = ("remax", "grpo-k2")
SEEDS = (1, 2, 3)
DEFAULT_OUT = os.path.join("benchmarks", "output", "quality")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="The demo's quick settings on fewer rows, one seed, two algorithms.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"Seeds (default {' '.join(map(str, SEEDS))}; 1 with --quick).")
    parser.add_argument("--algos", nargs="+", default=None, choices=list(VARIANTS),
                        help=f"Rows (default {' '.join(ALGOS)}; {' '.join(QUICK_ALGOS)} with "
                             "--quick).")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--no_results", action="store_true",
                        help="Do not update benchmarks/RESULTS.md even after a full run.")
    opts = parser.parse_args(argv)
    opts.seeds = opts.seeds or ([1] if opts.quick else list(SEEDS))
    opts.algos = opts.algos or list(QUICK_ALGOS if opts.quick else ALGOS)
    return opts


def demo_config(opts, seed):
    cfg = DemoConfig(seed=seed, output_dir=opts.out)
    if opts.quick:
        cfg = quick_config(cfg).replace(num_train=1200, num_test=200, remax_evals=2,
                                        eval_batches=2)
    return cfg


def with_flag(args, flag, value):
    """`args` with the value after `flag` replaced."""
    index = args.index(flag)
    return args[:index + 1] + [value] + args[index + 2:]


def stage3_runs(cfg, sft_dir, reward_dir, data_dir, algos):
    """Stage 3 for every algorithm from the same SFT and reward model -> ({algo: curve},
    {algo: failure})."""
    curves, failures = {}, {}
    for name in algos:
        args, _ = remax_args(cfg, sft_dir, reward_dir, data_dir)
        out = cfg.run_dir(f"step3_{name}")
        args = with_flag(args, "--output_dir", out)
        args += variant_flags(name, args[args.index("--actor_zero_stage") + 1])
        print(f"  stage 3: {name}", flush=True)
        try:
            run_stage(3, args, cfg.remax_ranks, out + ".log")
            curves[name] = run_curve(out)
        except StageFailed as err:
            failures[name] = str(err).splitlines()[0]
            print(f"  FAILED: {err}", flush=True)
    return curves, failures


def run_seed(cfg, algos):
    """Stages 1 and 2 once, then stage 3 per algorithm; returns (curves, failures)."""
    shutil.rmtree(os.path.join(cfg.output_dir, f"seed{cfg.seed}"), ignore_errors=True)
    data_dir, _ = build_data(cfg)
    model_dir, _ = build_model(cfg)
    print(f"seed {cfg.seed}: stage 1 (SFT)", flush=True)
    args, sft_dir = sft_args(cfg, model_dir, data_dir)
    run_stage(1, args, cfg.sft_ranks, sft_dir + ".log")
    print(f"seed {cfg.seed}: stage 2 (reward model)", flush=True)
    args, reward_dir = reward_args(cfg, sft_dir, data_dir)
    run_stage(2, args, cfg.rm_ranks, reward_dir + ".log")
    return stage3_runs(cfg, sft_dir, reward_dir, data_dir, algos)


def seeds_text(seeds):
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def section_markdown(opts, argv, cfg, curves_by_algo, failures, machine, wall_seconds,
                     plot_name):
    updates_note = ("the same prompts and number of updates for every algorithm "
                    f"({cfg.remax_batch_size} prompts per rank and update, {cfg.remax_ranks} "
                    f"ranks; K answers per prompt as in the row name)")
    lines = ["### Quality on the demo's task", "",
             f"Machine: {machine_line(machine)}.", "",
             f"SFT -> reward model -> stage 3 as in `make demo` (demo/config.py"
             f"{', --quick settings' if opts.quick else ''}), {seeds_text(opts.seeds)}; "
             "stage 3 with each algorithm from the same SFT "
             f"and reward model, {updates_note}, the demo's ReMax learning rate for all (not "
             "tuned per algorithm). Eval reward: the reward model on sampled answers to held-out "
             "prompts. Rule metric: the share of helpful words in those answers, from the text. "
             "Wall time: summed `train/e2e_seconds` (evaluations excluded). Mean ± sd over seeds.",
             "", quality_table(curves_by_algo), "", f"![quality]({plot_name})", ""]
    lines += footer_lines("benchmarks.quality", argv, failures, wall_seconds)
    return "\n".join(lines) + "\n"


def main(argv=None):
    start = time.time()
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    machine = describe_machine("cpu")
    curves_by_algo = {name: [] for name in opts.algos}
    failures = {}
    for seed in opts.seeds:
        cfg = demo_config(opts, seed)
        try:
            curves, seed_failures = run_seed(cfg, opts.algos)
        except StageFailed as err:  # stage 1 or 2: nothing to compare for this seed
            failures[f"seed {seed}"] = str(err).splitlines()[0]
            print(f"FAILED: {err}", flush=True)
            continue
        for name in opts.algos:
            curves_by_algo[name].append(curves.get(name, []))
        failures.update({f"{name}, seed {seed}": m for name, m in seed_failures.items()})
    plot_path = os.path.join(opts.out, "quality.png")
    plot_quality(curves_by_algo, plot_path, f"stage 3 on the demo's task, {seeds_text(opts.seeds)}")
    markdown = section_markdown(opts, argv, cfg, curves_by_algo, failures, machine,
                                time.time() - start, "quality.png")
    with open(os.path.join(opts.out, "quality.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(opts.out, "quality.json"), "w") as f:
        json.dump(json_safe({"machine": machine, "seeds": opts.seeds, "curves": curves_by_algo,
                             "failures": failures}), f, indent=2)
    print("\n" + markdown)
    full = not opts.quick and set(opts.seeds) >= set(SEEDS) and set(opts.algos) >= set(ALGOS)
    if full and not opts.no_results:
        shutil.copy(plot_path, os.path.join(os.path.dirname(RESULTS_PATH), "quality.png"))
        print(f"updated {update_results('quality', markdown)}")
    print(f"wrote {os.path.join(opts.out, 'quality.md')}, quality.png and quality.json")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
