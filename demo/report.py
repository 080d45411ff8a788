"""Turn the three stages' logs into the demo's evidence: a summary (summary.json), the table printed
at the end, `report.md` and `curves.png`."""
import json
import os

from demo import metrics
from utils.training import read_metrics

EVAL_KEYS = ("reward", "greedy_reward", "kl", "entropy", "length", "greedy_length", "ppl")


def summarize(cfg, seconds, sft_dir, reward_dir, remax_dir, data_dir):
    """Everything the report, the plot and the threshold check need, as plain JSON values."""
    sft_evals = [r for r in read_metrics(sft_dir) if "Test/ppl" in r]
    rm_evals = [r for r in read_metrics(reward_dir) if "Test/acc" in r]
    test_rows = metrics.read_test_rows(data_dir)
    chosen, rejected = metrics.reward_model_scores(reward_dir, test_rows, cfg.max_seq_len)
    agreement = metrics.pairwise_accuracies(chosen, rejected, test_rows)

    remax_records = read_metrics(remax_dir)
    evals = [r for r in remax_records if "eval/reward" in r]
    answers = metrics.read_saved_answers(remax_dir)
    rule = metrics.rule_curve(answers)
    curve = []
    for record in evals:
        step = record["step"]
        point = {"step": step, **{k: record[f"eval/{k}"] for k in EVAL_KEYS}}
        point.update(rule.get(step, {}))
        curve.append(point)
    # The final evaluation is logged at the same step as the last periodic one: keep the last.
    by_step = {p["step"]: p for p in curve}
    curve = [by_step[s] for s in sorted(by_step)]
    train = [{"step": r["step"] + 1, "reward": r["train/reward"],
              "baseline_reward": r["train/baseline_reward"], "kl": r["train/kl"]}
             for r in remax_records if "train/reward" in r]
    first, last = min(answers), max(answers)
    examples = [{"prompt": b["prompt"], "sft_sampled": b["answer"], "sft_greedy": b["greedy_answer"],
                 "remax_sampled": a["answer"], "remax_greedy": a["greedy_answer"]}
                for b, a in zip(answers[first][:4], answers[last][:4])]
    return {
        "seed": cfg.seed,
        "wall_seconds": sum(seconds.values()),
        "seconds": seconds,
        "config": vars(cfg).copy(),
        "sft": {"ppl_before": sft_evals[0]["Test/ppl"], "ppl_after": sft_evals[-1]["Test/ppl"],
                "curve": [[r["step"], r["Test/ppl"]] for r in sft_evals]},
        "reward_model": {"acc_before": rm_evals[0]["Test/acc"], "acc_after": rm_evals[-1]["Test/acc"],
                         "curve": [[r["step"], r["Test/acc"]] for r in rm_evals],
                         "test_pairs": len(test_rows), **agreement},
        "remax": {"target_kl": cfg.target_kl, "before": curve[0], "after": curve[-1],
                  "curve": curve, "kl_curve": [p["kl"] for p in curve], "train": train,
                  "examples": examples},
    }


def write_summary(summary, path):
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)


def table_rows(summary):
    """(quantity, before, after) rows of the summary table."""
    sft, rm, before, after = (summary["sft"], summary["reward_model"], summary["remax"]["before"],
                              summary["remax"]["after"])
    gain = after["rule_sampled"] / before["rule_sampled"] - 1 if before["rule_sampled"] else 0.0
    return [
        ("SFT perplexity (held-out chosen answers)", f"{sft['ppl_before']:.1f}",
         f"{sft['ppl_after']:.2f}"),
        ("reward model accuracy vs noisy labels (stage-2 eval split)",
         f"{rm['acc_before']:.3f}", f"{rm['acc_after']:.3f}"),
        (f"reward model accuracy vs noisy labels ({rm['test_pairs']} held-out pairs)", "",
         f"{rm['acc_labels']:.3f}"),
        (f"reward model accuracy vs the rule ({rm['rule_pairs']} of them, rule scores differ)",
         "", f"{rm['acc_rule']:.3f}"),
        ("  (the noisy labels agree with the rule on)", "", f"{rm['label_rule_agreement']:.3f}"),
        ("ReMax eval reward, sampled answers", f"{before['reward']:.3f}", f"{after['reward']:.3f}"),
        ("ReMax eval reward, greedy answers (baseline)", f"{before['greedy_reward']:.3f}",
         f"{after['greedy_reward']:.3f}"),
        ("rule metric: helpful-word share, sampled", f"{before['rule_sampled']:.3f}",
         f"{after['rule_sampled']:.3f} ({gain:+.0%})"),
        ("rule metric: helpful-word share, greedy", f"{before['rule_greedy']:.3f}",
         f"{after['rule_greedy']:.3f}"),
        (f"eval KL to the SFT policy (target_kl {summary['remax']['target_kl']})",
         f"{before['kl']:.3f}", f"{after['kl']:.3f}"),
        ("answer length in tokens, sampled / greedy",
         f"{before['length']:.1f} / {before['greedy_length']:.1f}",
         f"{after['length']:.1f} / {after['greedy_length']:.1f}"),
        ("policy perplexity on SFT eval data", f"{before['ppl']:.1f}", f"{after['ppl']:.1f}"),
    ]


def format_table(summary, markdown=False):
    rows = table_rows(summary)
    if markdown:
        lines = ["| | before | after |", "|---|---:|---:|"]
        lines += [f"| {q} | {b} | {a} |" for q, b, a in rows]
        return "\n".join(lines)
    width = max(len(q) for q, _, _ in rows)
    lines = [f"{'':{width}}  {'before':>10}  {'after':>14}"]
    lines += [f"{q:{width}}  {b:>10}  {a:>14}" for q, b, a in rows]
    return "\n".join(lines)


def format_seconds(summary):
    parts = ", ".join(f"{name} {s:.0f} s" for name, s in summary["seconds"].items())
    return f"wall time {summary['wall_seconds']:.0f} s ({parts})"


def write_markdown(summary, failures, path, curves_name="curves.png"):
    remax = summary["remax"]
    lines = [
        f"# ReMax demo report (seed {summary['seed']})",
        "",
        "SFT, reward-model training and ReMax on a synthetic preference task (prefer answers with "
        "a larger share of helpful words), on the CPU through the `deepspeed` launcher.",
        "",
        format_seconds(summary) + ".",
        "",
        f"![curves]({curves_name})",
        "",
        format_table(summary, markdown=True),
        "",
        "Before = the SFT policy (ReMax step 0); after = the policy at the last ReMax step. "
        "Eval numbers are on held-out prompts; the rule metric is the mean share of helpful words "
        "in the answers, computed from the text and not from the reward model.",
        "",
        "## Per evaluation",
        "",
        "| step | reward | greedy reward | KL | entropy | rule sampled | rule greedy | length |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in remax["curve"]:
        lines.append(f"| {p['step']} | {p['reward']:.3f} | {p['greedy_reward']:.3f} | "
                     f"{p['kl']:.3f} | {p['entropy']:.3f} | {p.get('rule_sampled', float('nan')):.3f}"
                     f" | {p.get('rule_greedy', float('nan')):.3f} | {p['length']:.1f} |")
    lines += ["", "## Answers to held-out prompts", ""]
    for ex in remax["examples"]:
        prompt = " ".join(ex["prompt"].split())
        lines += [f"- **{prompt}**",
                  f"  - SFT: sampled `{ex['sft_sampled'].strip()}`, greedy "
                  f"`{ex['sft_greedy'].strip()}`",
                  f"  - ReMax: sampled `{ex['remax_sampled'].strip()}`, greedy "
                  f"`{ex['remax_greedy'].strip()}`"]
    lines += ["", "## Checks", ""]
    lines += [f"- FAILED: {f}" for f in failures] or ["- all acceptance thresholds met"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_curves(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    remax = summary["remax"]
    steps = [p["step"] for p in remax["curve"]]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    (sft_ax, rm_ax, reward_ax), (rule_ax, kl_ax, len_ax) = axes

    sft = summary["sft"]["curve"]
    sft_ax.plot([s for s, _ in sft], [p for _, p in sft], "o-")
    sft_ax.set_yscale("log")
    sft_ax.set(title="stage 1: SFT perplexity (held out)", xlabel="optimizer step")

    rm = summary["reward_model"]
    rm_ax.plot([s for s, _ in rm["curve"]], [a for _, a in rm["curve"]], "o-",
               label="vs noisy labels")
    rm_ax.axhline(rm["acc_rule"], color="C2", ls="--", label=f"vs rule, final ({rm['acc_rule']:.2f})")
    rm_ax.axhline(rm["label_rule_agreement"], color="grey", ls=":", label="labels vs rule")
    rm_ax.set(title="stage 2: reward-model accuracy (held out)", xlabel="optimizer step",
              ylim=(0.4, 1.02))
    rm_ax.legend(loc="lower right", fontsize=8)

    train = remax["train"]
    reward_ax.plot([t["step"] for t in train], [t["reward"] for t in train], color="C0", alpha=0.25,
                   lw=0.8, label="train, sampled")
    reward_ax.plot(steps, [p["reward"] for p in remax["curve"]], "o-", color="C0",
                   label="eval, sampled")
    reward_ax.plot(steps, [p["greedy_reward"] for p in remax["curve"]], "s--", color="C1",
                   label="eval, greedy (baseline)")
    reward_ax.set(title="stage 3: ReMax reward (held-out prompts)", xlabel="ReMax step")
    reward_ax.legend(fontsize=8)

    rule_ax.plot(steps, [p.get("rule_sampled") for p in remax["curve"]], "o-", label="sampled")
    rule_ax.plot(steps, [p.get("rule_greedy") for p in remax["curve"]], "s--", label="greedy")
    before = remax["before"]["rule_sampled"]
    rule_ax.axhline(before * 1.25, color="grey", ls=":", label="SFT sampled +25 %")
    rule_ax.set(title="rule metric: helpful-word share", xlabel="ReMax step", ylim=(0, 1))
    rule_ax.legend(fontsize=8)

    kl_ax.plot(steps, [p["kl"] for p in remax["curve"]], "o-", label="eval KL")
    kl_ax.axhline(remax["target_kl"], color="red", ls=":", label="target_kl")
    kl_ax.set(title="KL(policy || SFT) per token", xlabel="ReMax step")
    kl_ax.legend(fontsize=8)

    len_ax.plot(steps, [p["entropy"] for p in remax["curve"]], "o-", label="entropy (nats/token)")
    len_ax.plot(steps, [p["length"] / 4 for p in remax["curve"]], "s--",
                label="answer length / 4 (tokens)")
    len_ax.set(title="entropy and length: no collapse", xlabel="ReMax step", ylim=(0, None))
    len_ax.legend(fontsize=8)

    fig.suptitle(f"ReMax CPU demo, seed {summary['seed']}: "
                 f"{summary['wall_seconds']:.0f} s on {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
