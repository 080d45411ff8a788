"""The benchmarks' arithmetic (medians, ratios, run order, batch search, results sections, quality
curves) with numbers checkable by hand, and one quick end-to-end run of the algorithm benchmark."""
import json
import math
from types import SimpleNamespace
import os
import subprocess
import sys

import pytest

from benchmarks import table
from benchmarks.batch_search import format_max_batch, largest_fitting_batch
from benchmarks.quality_report import mean_curve, run_curve
from benchmarks.results import replace_section
from benchmarks.variants import variant_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")


def step(number, e2e, **more):
    return {"step": number, "train/e2e_seconds": e2e, **more}


def test_median_ignores_non_finite_values():
    assert table.median([3.0, 1.0, 2.0]) == 2.0
    assert table.median([4.0, 1.0, NAN, 3.0, 2.0]) == 2.5
    assert math.isnan(table.median([NAN, None]))


def test_median_after_warmup_drops_the_first_update_by_step_not_by_file_order():
    records = [step(1, 5.0), {"step": 0, "eval/reward": 1.0}, step(2, 7.0), step(0, 100.0),
               step(3, 6.0)]
    assert table.median_after_warmup(records, "train/e2e_seconds") == 6.0
    assert math.isnan(table.median_after_warmup(records, "train/experience_seconds"))


def test_run_summary_has_every_column_and_counts_measured_updates():
    records = [step(0, 9.0, **{"train/generation_seconds": 5.0}),
               step(1, 3.0, **{"train/generation_seconds": 2.0})]
    summary = table.run_summary(records, peak_memory_mib=512.0)
    assert summary["e2e_s"] == 3.0 and summary["generation_s"] == 2.0
    assert math.isnan(summary["experience_s"])
    assert summary["peak_memory_mib"] == 512.0 and summary["measured_steps"] == 1


def test_ratios_are_to_the_reference_row_and_nan_without_it():
    rows = {"remax": table.combine_runs([{"e2e_s": 2.0, "peak_memory_mib": 600.0},
                                         {"e2e_s": 4.0, "peak_memory_mib": 800.0}]),
            "ppo-1ep": table.combine_runs([{"e2e_s": 6.0, "peak_memory_mib": 1400.0}])}
    table.add_ratios(rows, "ppo-1ep")
    assert rows["remax"]["e2e_vs_ppo"] == pytest.approx(0.5)      # median(2, 4) / 6
    assert rows["remax"]["memory_vs_ppo"] == pytest.approx(0.5)   # median(600, 800) / 1400
    assert rows["ppo-1ep"]["e2e_vs_ppo"] == 1.0
    lonely = table.add_ratios({"remax": {"e2e_s": 2.0, "peak_memory_mib": 1.0}}, "ppo-1ep")
    assert math.isnan(lonely["remax"]["e2e_vs_ppo"])


def test_target_lines_say_met_missed_or_not_available():
    rows = {"remax": {"memory_vs_ppo": 0.65, "e2e_vs_ppo": 0.8}}
    lines = table.target_lines(rows, "remax", "ppo-1ep", (("memory_vs_ppo", 0.7),
                                                          ("e2e_vs_ppo", 0.75)))
    assert lines[0].endswith("met)") and lines[1].endswith("missed)")
    assert table.target_lines({}, "remax", "ppo-1ep", (("e2e_vs_ppo", 0.75),))[0].endswith("n/a)")


def test_runs_alternate_between_algorithms():
    assert table.alternating_order(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"),
                                                           (1, "a"), (1, "b"), (1, "c")]


def test_markdown_table_and_json_show_missing_numbers():
    rows = {"remax": {"e2e_s": 1.234, "experience_s": NAN, "max_batch": ">=64"}}
    text = table.markdown_table(rows, ["e2e_s", "experience_s", "max_batch"])
    assert text.splitlines()[2] == "| remax | 1.23 | NaN | >=64 |"
    assert table.json_safe({"a": [NAN, 1.0]}) == {"a": [None, 1.0]}


def probe_counter(limit):
    probes = []

    def fits(batch):
        probes.append(batch)
        return batch <= limit
    return fits, probes


@pytest.mark.parametrize("limit, expected, probed", [
    (40, (32, True), [16, 32, 64]),      # doubling stops at the first OOM
    (1000, (64, False), [16, 32, 64]),   # three probes all fit: only a lower bound
    (5, (4, True), [16, 8, 4]),          # halving until one fits
    (0, (None, False), [16, 8, 4]),
])
def test_batch_search_probes_at_most_three_batches(limit, expected, probed):
    fits, probes = probe_counter(limit)
    assert largest_fitting_batch(fits, 16) == expected
    assert probes == probed
    assert format_max_batch(*expected) == {32: "32", 64: ">=64", 4: "4", None: "none"}[expected[0]]


def test_replace_section_replaces_between_markers_or_appends():
    text = "# Results\n\nintro\n"
    once = replace_section(text, "algorithms-cpu", "table 1")
    assert once.startswith("# Results\n\nintro\n") and "table 1" in once
    twice = replace_section(once + "\nfooter\n", "algorithms-cpu", "table 2")
    assert "table 1" not in twice and "table 2" in twice and twice.endswith("footer\n")


def test_variant_flags_select_the_algorithm_and_give_ppo_a_critic_stage():
    assert variant_flags("rloo-k2", 2) == ["--algo", "rloo", "--num_samples_per_prompt", 2]
    assert variant_flags("ppo-4ep", 3) == ["--algo", "ppo", "--ppo_epochs", 4,
                                           "--critic_zero_stage", 3]
    with pytest.raises(ValueError, match="unknown benchmark row"):
        variant_flags("dpo", 2)


def test_efficiency_rows_switch_off_all_features_or_one(tmp_path):
    from benchmarks.variants import ABLATIONS, EFFICIENCY_FLAGS, FAITHFUL

    off = sorted(EFFICIENCY_FLAGS.values())
    assert sorted(variant_flags(FAITHFUL, 2)[2:]) == off     # switches: no values
    assert variant_flags("remax-no-chunked-logits", 2) == ["--algo", "remax", "--unchunked_logits"]
    assert sorted(f for name in ABLATIONS for f in variant_flags(name, 2)[2:]) == off
    # Every flag exists in stage 3 and parses.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "stage3_main_for_flags", os.path.join(ROOT, "step3_rlhf_finetuning", "main.py"))
    stage3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage3)
    args = stage3.parse_args(["--actor_model_name_or_path", "a", "--reward_model_name_or_path", "r",
                              "--output_dir", str(tmp_path)] + variant_flags(FAITHFUL, 2)[2:])
    assert args.unchunked_logits and args.separate_baseline_generation and args.pad_prompts_to_max_len
    # The chunk: --logit_chunk_mib of float32 logits in answer tokens; none when unchunked or for
    # a model type whose forward changes the head's output.
    config = lambda vocab, kind="opt": SimpleNamespace(vocab_size=vocab, model_type=kind)  # noqa: E731
    assert stage3.logit_chunk_tokens(args, config(32768)) is None
    args.unchunked_logits = False
    assert stage3.logit_chunk_tokens(args, config(32768)) == 1024
    assert stage3.logit_chunk_tokens(args, config(1024, "llama")) == 32768
    assert stage3.logit_chunk_tokens(args, config(32768, "gemma2")) is None
    args.logit_chunk_mib = 1
    assert stage3.logit_chunk_tokens(args, config(2 ** 20)) == 1  # never 0
    with pytest.raises(SystemExit):
        stage3.parse_args(["--actor_model_name_or_path", "a", "--reward_model_name_or_path", "r",
                           "--output_dir", str(tmp_path), "--logit_chunk_mib", "0"])


def test_decode_floor_times_exactly_the_decode_products():
    """Counted through a torch-function mode: per new token, 8 products per layer (q, k, v, the
    two attention products against the cache at its length, output, two MLP) and the LM head on
    one position per row, with the multiply-adds of a decode of that shape."""
    from torch.overrides import TorchFunctionMode

    from benchmarks.algorithms import QUICK_SIZE
    from benchmarks.floor import DecodeShape, decode_floor_seconds

    class CountProducts(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count, self.macs = 0, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
                a, b = args
                self.count += 1
                self.macs += a.numel() * b.size(-1)
            return func(*args, **(kwargs or {}))

    import torch

    size, shape = QUICK_SIZE, DecodeShape(rows=3, prompt_len=5, answer_len=4)
    counter = CountProducts()
    with counter:
        seconds = decode_floor_seconds(size, shape, repeats=1)
    assert seconds > 0
    h, v, rows = size.hidden_size, size.vocab_size, shape.rows
    assert counter.count == shape.answer_len * (8 * size.num_layers + 1)
    cache = sum(shape.prompt_len + t + 1 for t in range(shape.answer_len))
    per_token_layer = rows * (4 * h * h + 2 * h * 4 * h)      # q, k, v, o and the MLP
    attention = 2 * rows * h * cache                          # q K^T and p V, over the steps
    expected = size.num_layers * (shape.answer_len * per_token_layer + attention) \
        + shape.answer_len * rows * h * v
    assert counter.macs == expected


def test_efficiency_targets_and_ratios_to_the_faithful_path():
    from benchmarks.efficiency import add_ratios, target, target_lines

    rows = {"remax": {"e2e_s": 2.0, "peak_memory_mib": 700.0, "experience_peak_mib": 300.0,
                      "generation_s": 1.0},
            "remax-faithful": {"e2e_s": 5.0, "peak_memory_mib": 1000.0,
                               "experience_peak_mib": 1000.0, "generation_s": 2.0},
            "remax-no-one-generation-pass": {"generation_s": 1.6}}
    add_ratios(rows)
    assert rows["remax"]["e2e_vs_faithful"] == pytest.approx(0.4)
    assert rows["remax"]["experience_memory_vs_faithful"] == pytest.approx(0.3)
    lines = target_lines("varied", rows)
    assert lines[0] == "remax e2e / faithful = 0.400 (target <= 0.5: met)"
    assert lines[1].startswith("remax generation / remax-no-one-generation-pass = 0.625") \
        and lines[1].endswith("met)")
    assert lines[3].endswith("n/a)") and lines[4].endswith("(target <= 0.7: met)")  # 0.7 <= 0.7
    assert target("x", NAN, 1.0).endswith("n/a)") and target("x", 2.0, 1.0).endswith("missed)")


def test_run_curve_counts_training_time_before_each_evaluation(tmp_path):
    records = [{"step": 0, "eval/reward": 1.0}, step(0, 2.0), step(1, 3.0),
               {"step": 2, "eval/reward": 2.0}, step(2, 4.0), {"step": 3, "eval/reward": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "evaluation").mkdir()
    answers = [{"id": 0, "global_step": 0, "answer": " the kind tree.",       # 1 of 3 helpful
                "greedy_answer": " the the."},
               {"id": 1, "global_step": 2, "answer": " kind clear.", "greedy_answer": " kind."}]
    (tmp_path / "evaluation" / "rank_0.json").write_text(json.dumps(answers))
    curve = run_curve(str(tmp_path))
    assert [(p["update"], p["wall_s"]) for p in curve] == [(0, 0), (2, 5.0), (3, 9.0)]
    assert curve[0]["rule"] == pytest.approx(1 / 3) and curve[1]["rule"] == 1.0
    assert (curve[0]["rule_greedy"], curve[1]["rule_greedy"]) == (0.0, 1.0)
    assert math.isnan(curve[2]["rule"])   # no answers saved at that evaluation


def test_mean_curve_averages_seeds_at_the_same_update():
    seed_a = [{"update": 0, "wall_s": 0.0, "reward": 1.0, "greedy_reward": NAN, "kl": 0.0,
               "rule": 0.2, "rule_greedy": 0.1}]
    seed_b = [{"update": 0, "wall_s": 2.0, "reward": 3.0, "greedy_reward": NAN, "kl": 0.0,
               "rule": 0.4, "rule_greedy": 0.3}]
    point = mean_curve([seed_a, seed_b])[0]
    assert (point["reward"], point["reward_min"], point["reward_max"]) == (2.0, 1.0, 3.0)
    assert point["wall_s"] == 1.0 and math.isnan(point["greedy_reward"])


@pytest.mark.slow
def test_quick_efficiency_benchmark_writes_both_setups(tmp_path):
    out = tmp_path / "efficiency"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", "--quick", "--out",
                           str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = json.loads((out / "efficiency.json").read_text())
    for setup in ("uniform", "varied"):
        rows = report[setup]["rows"]
        assert set(rows) == {"remax", "remax-faithful"}
        assert rows["remax-faithful"]["e2e_vs_faithful"] == 1.0
        for row in rows.values():
            for column in ("generation_s", "e2e_s", "peak_memory_mib", "experience_peak_mib",
                           "training_peak_mib"):
                assert row[column] is not None and row[column] > 0, (setup, column, row)
    assert report["floor"]["one_pass_s"] > 0
    text = (out / "efficiency.md").read_text()
    assert "Decoding floor" in text and "| remax-faithful |" in text


@pytest.mark.slow
def test_quick_algorithm_benchmark_writes_finite_numbers(tmp_path):
    out = tmp_path / "algorithms"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.algorithms", "--quick", "--algos",
                           "remax", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(out / "algorithms.json") as f:
        row = json.load(f)["rows"]["remax"]
    assert "| remax |" in (out / "algorithms.md").read_text()
    assert row["measured_steps"] == 1
    assert row["e2e_vs_ppo"] is None and row["memory_vs_ppo"] is None   # no PPO row was run
    measured = [c for c, _ in table.STEP_COLUMNS] + [table.MEMORY_COLUMN]
    present = [c for c in measured if c != "experience_s"]
    assert all(isinstance(row[c], float) and row[c] > 0 for c in present), row
    if row["experience_s"] is None:
        pytest.xfail("stage 3 does not log train/experience_seconds yet")
    assert row["experience_s"] > 0
