"""The acceptance figures `make demo` checks (it exits non-zero and says why when one is missed)."""

MAX_WALL_SECONDS = 600          # the whole demo, data and model building included (2 CPU cores)
MIN_RM_RULE_ACCURACY = 0.85     # reward model vs the rule, held-out pairs whose rule scores differ
MIN_RULE_GAIN = 0.25            # relative rise of the rule metric of sampled answers
MAX_EMPTY_GREEDY = 0.05         # share of empty greedy answers after ReMax


def check(summary, max_wall_seconds=MAX_WALL_SECONDS, min_rm_rule_accuracy=MIN_RM_RULE_ACCURACY,
          min_rule_gain=MIN_RULE_GAIN):
    """The thresholds `summary` (see demo.report.summarize) misses, as sentences; [] when all hold."""
    failures = []
    remax, before, after = summary["remax"], summary["remax"]["before"], summary["remax"]["after"]
    if summary["wall_seconds"] >= max_wall_seconds:
        failures.append(f"wall time {summary['wall_seconds']:.0f} s is not under "
                        f"{max_wall_seconds} s")
    rm_acc = summary["reward_model"]["acc_rule"]
    if rm_acc < min_rm_rule_accuracy:
        failures.append(f"reward model agrees with the rule on {rm_acc:.3f} of held-out pairs, "
                        f"below {min_rm_rule_accuracy}")
    want = before["rule_sampled"] * (1 + min_rule_gain)
    if after["rule_sampled"] < want:
        failures.append(f"rule metric of sampled answers {before['rule_sampled']:.3f} -> "
                        f"{after['rule_sampled']:.3f}: less than the +{min_rule_gain:.0%} "
                        f"needed ({want:.3f})")
    if after["reward"] <= before["reward"]:
        failures.append(f"eval reward did not rise ({before['reward']:.3f} -> "
                        f"{after['reward']:.3f})")
    worst_kl = max(remax["kl_curve"])
    if worst_kl >= remax["target_kl"]:
        failures.append(f"eval KL reached {worst_kl:.3f}, not below --target_kl "
                        f"{remax['target_kl']}")
    if after["greedy_empty"] > MAX_EMPTY_GREEDY:
        failures.append(f"collapse: {after['greedy_empty']:.0%} of greedy answers are empty")
    if after["rule_greedy"] < before["rule_greedy"]:
        failures.append(f"collapse: rule metric of greedy answers fell "
                        f"({before['rule_greedy']:.3f} -> {after['rule_greedy']:.3f})")
    return failures
