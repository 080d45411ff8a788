"""The algorithm benchmark's arithmetic, pure: per-run medians from metrics.jsonl records, the
median over runs, ratios to PPO, the run order, and the markdown table. NaN marks a number a run
did not produce (a metric stage 3 does not log, a failed run); JSON gets null for it."""
import math

NAN = float("nan")

# (column, metrics.jsonl key): per-step timings, each the median over the measured steps.
STEP_COLUMNS = (("generation_s", "train/generation_seconds"),
                ("experience_s", "train/experience_seconds"),
                ("training_s", "train/training_seconds"),
                ("e2e_s", "train/e2e_seconds"),
                ("answer_tokens_per_s", "train/answer_tokens_per_second"))
MEMORY_COLUMN = "peak_memory_mib"
# (column, metrics.jsonl key): the peak memory of one phase of an update, the largest over the
# measured updates (stage 3 logs them; on the CPU the resident set, see utils/perf.py).
PHASE_MEMORY_COLUMNS = (("experience_peak_mib", "train/experience_peak_mib"),
                        ("experience_rise_mib", "train/experience_rise_mib"),
                        ("training_peak_mib", "train/training_peak_mib"),
                        ("training_rise_mib", "train/training_rise_mib"))
RATIO_COLUMNS = (("e2e_vs_ppo", "e2e_s"), ("memory_vs_ppo", MEMORY_COLUMN))
HEADERS = {"algo": "algo", "generation_s": "generation s", "experience_s": "experience s",
           "training_s": "training s", "e2e_s": "e2e s", "answer_tokens_per_s": "answer tokens/s",
           MEMORY_COLUMN: "peak memory MiB", "max_batch": "max batch / device",
           "e2e_vs_ppo": "e2e / PPO", "memory_vs_ppo": "memory / PPO",
           "experience_peak_mib": "experience peak MiB", "training_peak_mib": "training peak MiB",
           "experience_rise_mib": "experience rise MiB", "training_rise_mib": "training rise MiB"}
STEP_KEY = "train/e2e_seconds"  # every update's record holds it


def is_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def median(values):
    """Median of the finite values; NaN when there are none."""
    finite = sorted(v for v in values if is_finite(v))
    if not finite:
        return NAN
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else (finite[middle - 1] + finite[middle]) / 2


def step_records(records):
    """The per-update records of a metrics.jsonl, in step order."""
    return sorted((r for r in records if STEP_KEY in r), key=lambda r: r["step"])


def median_after_warmup(records, key, warmup=1):
    """Median of `key` over the updates after the first `warmup` ones (NaN if none logs it)."""
    return median(r.get(key, NAN) for r in step_records(records)[warmup:])


def max_after_warmup(records, key, warmup=1):
    """Largest finite `key` over the updates after the first `warmup` ones (NaN if none)."""
    values = [r.get(key, NAN) for r in step_records(records)[warmup:]]
    return max((v for v in values if is_finite(v)), default=NAN)


def run_summary(records, peak_memory_mib, warmup=1):
    """One run's row: the median of every step column after the warm-up, and its peak memory."""
    summary = {column: median_after_warmup(records, key, warmup) for column, key in STEP_COLUMNS}
    summary[MEMORY_COLUMN] = peak_memory_mib
    for column, key in PHASE_MEMORY_COLUMNS:
        summary[column] = max_after_warmup(records, key, warmup)
    summary["measured_steps"] = max(0, len(step_records(records)) - warmup)
    return summary


def combine_runs(summaries):
    """An algorithm's row: the median over its runs of every column."""
    columns = [c for c, _ in STEP_COLUMNS] + [MEMORY_COLUMN] + [c for c, _ in PHASE_MEMORY_COLUMNS]
    row = {c: median(s.get(c, NAN) for s in summaries) for c in columns}
    row["measured_steps"] = sum(s.get("measured_steps", 0) for s in summaries)
    return row


def ratio(value, reference):
    if not (is_finite(value) and is_finite(reference)) or reference == 0:
        return NAN
    return value / reference


def add_ratios(rows, reference):
    """Add e2e and memory ratios to the `reference` row (NaN without it); returns `rows`."""
    base = rows.get(reference, {})
    for row in rows.values():
        for ratio_column, column in RATIO_COLUMNS:
            row[ratio_column] = ratio(row.get(column, NAN), base.get(column, NAN))
    return rows


def alternating_order(names, repeats):
    """[(repeat, name), ...]: A B C D, A B C D, ... so drift of the machine hits every algorithm."""
    return [(repeat, name) for repeat in range(repeats) for name in names]


def format_number(value):
    if not is_finite(value):
        return "NaN"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.2f}" if magnitude >= 1 else \
        f"{value:.3f}"


def markdown_table(rows, columns):
    """rows: {name: {column: value}} -> a markdown table with `columns` after the algo column."""
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in ["algo", *columns]) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        cells = [format_cell(row.get(c, NAN)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cell(value):
    return value if isinstance(value, str) else format_number(value)


def json_safe(value):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def target_lines(rows, subject, reference, targets):
    """One line per (ratio column, limit): "remax e2e / ppo-1ep = 0.62 (target <= 0.75: met)"."""
    lines = []
    for ratio_column, limit in targets:
        value = rows.get(subject, {}).get(ratio_column, NAN)
        verdict = "n/a" if not is_finite(value) else "met" if value <= limit else "missed"
        lines.append(f"{subject} {HEADERS[ratio_column].replace('PPO', reference)} = "
                     f"{format_number(value)} (target <= {limit}: {verdict})")
    return lines
