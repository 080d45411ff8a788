"""The quality comparison's curves, table and plot: eval reward and the demo's rule metric (helpful-
word share of the answers, computed from the text) at every evaluation of a stage-3 run, against
updates and against wall time; aggregated over seeds."""
import statistics

from benchmarks.table import NAN, format_number, is_finite, step_records
from demo.metrics import read_saved_answers, rule_metric
from utils.training import read_metrics

METRICS = (("reward", "eval reward (sampled)"), ("rule", "rule metric: helpful-word share"))


def run_curve(run_dir):
    """[{update, wall_s, reward, greedy_reward, kl, rule, rule_greedy}] per evaluation of one
    stage-3 run.

    wall_s: the summed `train/e2e_seconds` of the updates before the evaluation (training time;
    the evaluations themselves are not counted). rule / rule_greedy: over the sampled / greedy
    answers it saved."""
    records = read_metrics(run_dir)
    evaluations = {r["step"]: r for r in records if "eval/reward" in r}  # the final one wins
    answers = read_saved_answers(run_dir)
    seconds = [(r["step"], r.get("train/e2e_seconds", NAN)) for r in step_records(records)]
    curve = []
    for update in sorted(evaluations):
        record = evaluations[update]
        saved = answers.get(update, [])
        curve.append({"update": update,
                      "wall_s": sum(s for step, s in seconds if step < update),
                      "reward": record["eval/reward"],
                      "greedy_reward": record.get("eval/greedy_reward", NAN),
                      "kl": record.get("eval/kl", NAN),
                      "rule": rule_metric(r["answer"] for r in saved) if saved else NAN,
                      "rule_greedy": rule_metric(r.get("greedy_answer", "") for r in saved)
                      if saved else NAN})
    return curve


def mean_curve(curves):
    """Seeds' curves of one algorithm -> per update: mean, min and max of every number."""
    updates = sorted(set.intersection(*(set(p["update"] for p in c) for c in curves)))
    merged = []
    for update in updates:
        points = [next(p for p in c if p["update"] == update) for c in curves]
        point = {"update": update}
        for key in ("wall_s", "reward", "greedy_reward", "kl", "rule", "rule_greedy"):
            values = [p[key] for p in points if is_finite(p[key])]
            point[key] = statistics.fmean(values) if values else NAN
            point[key + "_min"] = min(values) if values else NAN
            point[key + "_max"] = max(values) if values else NAN
        merged.append(point)
    return merged


def mean_and_sd(values):
    values = [v for v in values if is_finite(v)]
    if not values:
        return "NaN"
    mean = format_number(statistics.fmean(values))
    return f"{mean} ± {format_number(statistics.stdev(values))}" if len(values) > 1 else mean


def quality_table(curves_by_algo):
    """curves_by_algo: {algo: [curve per seed]} -> one markdown table, start and end of the runs."""
    lines = ["| algo | seeds | updates | eval reward, SFT → final | rule metric, SFT → final | "
             "final KL | training wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for algo, curves in curves_by_algo.items():
        curves = [c for c in curves if c]
        if not curves:
            lines.append(f"| {algo} | 0 | | failed | | | |")
            continue
        first, last = [c[0] for c in curves], [c[-1] for c in curves]
        start_to_end = lambda key: (f"{mean_and_sd([p[key] for p in first])} → "  # noqa: E731
                                    f"{mean_and_sd([p[key] for p in last])}")
        lines.append(f"| {algo} | {len(curves)} | {last[0]['update']} | {start_to_end('reward')} | "
                     f"{start_to_end('rule')} | {mean_and_sd([p['kl'] for p in last])} | "
                     f"{mean_and_sd([p['wall_s'] for p in last])} |")
    return "\n".join(lines)


def plot_quality(curves_by_algo, path, title):
    """One figure, 2 x 2: eval reward and rule metric against updates and against wall time; the
    mean over seeds, shaded between the seeds' min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for row, (key, label) in enumerate(METRICS):
        for column, (x_key, x_label) in enumerate((("update", "update"),
                                                  ("wall_s", "training wall time (s)"))):
            ax = axes[row][column]
            for index, (algo, curves) in enumerate(curves_by_algo.items()):
                curves = [c for c in curves if c]
                if not curves:
                    continue
                points = mean_curve(curves)
                xs = [p[x_key] for p in points]
                ax.plot(xs, [p[key] for p in points], "o-", color=f"C{index}", ms=3,
                        label=f"{algo} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
                ax.fill_between(xs, [p[key + "_min"] for p in points],
                                [p[key + "_max"] for p in points], color=f"C{index}", alpha=0.15)
            ax.set(xlabel=x_label, ylabel=label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

