"""`make demo`: SFT -> reward model -> ReMax on the CPU, then evidence that the policy improved.

    python -m demo.run_demo [--seed 1] [--output_dir demo_output] [--quick]

1. builds the synthetic preference data (remax-demo/helpful-words), the tokenizer and a tiny OPT
   (cached under <output_dir>/cache; a second run reuses them);
2. runs step1_supervised_finetuning/main.py, step2_reward_model_finetuning/main.py and
   step3_rlhf_finetuning/main.py through the `deepspeed` launcher (DS_ACCELERATOR=cpu);
3. prints a summary table, writes <output_dir>/report.md, curves.png and summary.json, and exits
   non-zero naming every acceptance threshold (demo/thresholds.py) that was missed.
"""
import time

_PROCESS_START = time.time()  # the wall time counts the imports too

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

from demo import thresholds  # noqa: E402
from demo.build import build_data, build_model  # noqa: E402
from demo.config import DemoConfig, quick_config, remax_args, reward_args, sft_args  # noqa: E402
from demo.report import (format_seconds, format_table, plot_curves, summarize,  # noqa: E402
                         write_markdown, write_summary)
from demo.stages import StageFailed, run_stage  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DemoConfig.seed,
                        help="Seed of the model initialisation and of every stage.")
    parser.add_argument("--output_dir", default=DemoConfig.output_dir)
    parser.add_argument("--quick", action="store_true",
                        help="A shortened demo (the slow test's): fewer rows, epochs and steps; "
                             "the full-size thresholds are not checked.")
    parser.add_argument("--no_check", action="store_true",
                        help="Report only; exit 0 even when a threshold is missed.")
    return parser.parse_args(argv)


def section(title):
    print(f"\n=== {title} ===", flush=True)


def run(cfg, check=True, start=None):
    """The demo; returns (summary, failures). `start`: the time the wall clock counts from."""
    start = time.time() if start is None else start
    seconds = {"startup": time.time() - start}
    shutil.rmtree(os.path.join(cfg.output_dir, f"seed{cfg.seed}"), ignore_errors=True)

    section("1/4 data, tokenizer and tiny model")
    data_dir, built_data = build_data(cfg)
    model_dir, built_model = build_model(cfg)
    print(f"  data  {data_dir} ({'built' if built_data else 'cached'})")
    print(f"  model {model_dir} ({'built' if built_model else 'cached'})")
    seconds["build"] = time.time() - start - seconds["startup"]

    section(f"2/4 stage 1: supervised fine-tuning ({cfg.sft_ranks} rank(s))")
    args, sft_dir = sft_args(cfg, model_dir, data_dir)
    seconds["sft"] = run_stage(1, args, cfg.sft_ranks, sft_dir + ".log")

    section(f"3/4 stage 2: reward model ({cfg.rm_ranks} rank(s))")
    args, reward_dir = reward_args(cfg, sft_dir, data_dir)
    seconds["reward"] = run_stage(2, args, cfg.rm_ranks, reward_dir + ".log")

    section(f"4/4 stage 3: ReMax ({cfg.remax_ranks} rank(s))")
    args, remax_dir = remax_args(cfg, sft_dir, reward_dir, data_dir)
    seconds["remax"] = run_stage(3, args, cfg.remax_ranks, remax_dir + ".log")

    section("evidence")
    report_start = time.time()
    summary = summarize(cfg, seconds, sft_dir, reward_dir, remax_dir, data_dir)
    seconds["report"] = time.time() - report_start
    summary["seconds"], summary["wall_seconds"] = seconds, time.time() - start
    failures = thresholds.check(summary) if check else []
    write_summary(summary, os.path.join(cfg.output_dir, "summary.json"))
    write_markdown(summary, failures, os.path.join(cfg.output_dir, "report.md"))
    plot_curves(summary, os.path.join(cfg.output_dir, "curves.png"))
    return summary, failures


def main(argv=None):
    opts = parse_args(argv)
    cfg = DemoConfig(seed=opts.seed, output_dir=opts.output_dir)
    if opts.quick:
        cfg = quick_config(cfg)
    try:
        summary, failures = run(cfg, check=not (opts.quick or opts.no_check),
                                start=_PROCESS_START)
    except StageFailed as err:
        print(f"\nmake demo: {err}", file=sys.stderr)
        return 1
    print()
    print(format_table(summary))
    print(format_seconds(summary))
    print(f"report: {os.path.join(cfg.output_dir, 'report.md')}, curves: "
          f"{os.path.join(cfg.output_dir, 'curves.png')}")
    if failures:
        print("\nmake demo: acceptance thresholds missed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    if not opts.quick and not opts.no_check:
        print("all acceptance thresholds met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
