"""`make demo`: the rule metric, the reward model's agreement, the threshold check and the report
(fast, by hand), and a shortened demo through the three stages (slow) that must move every number
in the right direction. The full-size thresholds live in demo/thresholds.py (checked by make demo)."""
import json
import os

import pytest

from demo import metrics, thresholds
from demo.build import build_data
from demo.config import DemoConfig, quick_config, remax_args, reward_args, sft_args
from demo.report import format_table, plot_curves, write_markdown
from demo.stages import _lines
from utils.data import synthetic
from utils.data.raw_datasets import get_raw_dataset


# ------------------------------------------------------------------------------------ the rule

def test_helpful_share_by_hand():
    assert synthetic.helpful_share(" kind clear the sun.") == 0.5
    assert synthetic.helpful_share(" Kind, CLEAR!") == 1.0
    assert synthetic.helpful_share(" ") == 0.0 and synthetic.helpful_share("") == 0.0


def test_rule_metric_is_not_gamed_by_length():
    short, long = " kind the", " kind the kind the kind the kind the"
    assert metrics.rule_metric([short]) == metrics.rule_metric([long]) == 0.5
    # An empty answer counts 0 (collapse to nothing is not rewarded by the metric).
    assert metrics.rule_metric([" kind.", ""]) == 0.5
    assert metrics.empty_share([" kind.", "", " . "]) == pytest.approx(2 / 3)
    assert metrics.rule_metric([]) == 0.0


def test_synthetic_rows_deterministic_and_preference_follows_the_rule():
    rows = synthetic.make_rows(400, seed=3)
    assert rows == synthetic.make_rows(400, seed=3)
    assert set(rows[0]) == {"prompt", "response", "chosen", "rejected"}
    assert rows[0]["prompt"].startswith("\n\nHuman: ") and rows[0]["prompt"].endswith("Assistant:")
    share = synthetic.helpful_share
    differ = [r for r in rows if share(r["chosen"]) != share(r["rejected"])]
    agree = sum(share(r["chosen"]) > share(r["rejected"]) for r in differ) / len(differ)
    assert 0.8 < agree < 0.97  # learnable, and noisy (Bradley-Terry labels)
    # helpful words come first in every answer
    for answer in (rows[0]["chosen"], rows[0]["rejected"]):
        flags = [w in synthetic.HELPFUL_WORDS for w in synthetic.answer_words(answer)]
        assert flags == sorted(flags, reverse=True)
    # SFT imitates the chosen answers: a mediocre share, with room to improve
    mean_chosen = sum(share(r["chosen"]) for r in rows) / len(rows)
    assert 0.25 < mean_chosen < 0.5


def test_demo_dataset_goes_through_the_hub_loader(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = DemoConfig(output_dir=str(tmp_path), num_train=30, num_test=10)
    data_dir, built = build_data(cfg)
    assert data_dir.endswith(synthetic.DEMO_DATASET_ID) and built
    assert os.path.exists(os.path.join(data_dir, "data", "train-00000-of-00001.parquet"))
    assert build_data(cfg) == (data_dir, False)  # cached
    ds = get_raw_dataset(data_dir, None, 1234, 0)
    assert ds.dataset_name_clean == "remax_demo_helpful_words"
    assert len(ds.get_train_data()) == 30 and len(ds.get_eval_data()) == 10
    assert metrics.read_test_rows(data_dir) == synthetic.make_rows(10, cfg.data_seed + 1)


# ------------------------------------------------------------------------------------ evidence

def test_pairwise_accuracies_by_hand():
    rows = [{"chosen": " kind kind", "rejected": " the the"},      # rule: chosen better
            {"chosen": " the the", "rejected": " kind the"},        # rule: rejected better
            {"chosen": " kind the", "rejected": " clear a"}]        # rule: tie (not counted)
    got = metrics.pairwise_accuracies([1.0, 0.0, 0.0], [0.0, 1.0, 1.0], rows)
    # labels: right, wrong, wrong -> 1/3; rule: right (1 > 0), right (0 < 1) -> 2/2
    assert got == {"acc_labels": pytest.approx(1 / 3), "acc_rule": 1.0, "rule_pairs": 2,
                   "label_rule_agreement": 0.5}


def test_rule_curve_from_saved_answers(tmp_path):
    os.makedirs(tmp_path / "evaluation")
    for rank, records in enumerate([
            [{"id": 0, "global_step": 0, "answer": " the a.", "greedy_answer": " kind the."},
             {"id": 1, "global_step": 5, "answer": " kind kind.", "greedy_answer": ""}],
            [{"id": 0, "global_step": 0, "answer": " kind a.", "greedy_answer": " kind the."}]]):
        with open(tmp_path / "evaluation" / f"rank_{rank}.json", "w") as f:
            json.dump(records, f)
    curve = metrics.rule_curve(metrics.read_saved_answers(str(tmp_path)))
    assert curve == {0: {"rule_sampled": 0.25, "rule_greedy": 0.5, "greedy_empty": 0.0, "answers": 2},
                     5: {"rule_sampled": 1.0, "rule_greedy": 0.0, "greedy_empty": 1.0, "answers": 1}}


def fake_summary(**after):
    before = {"step": 0, "reward": 1.0, "greedy_reward": 1.5, "kl": 0.0, "entropy": 2.3,
              "length": 9.0, "greedy_length": 8.0, "ppl": 18.0, "rule_sampled": 0.4,
              "rule_greedy": 0.4, "greedy_empty": 0.0, "answers": 256}
    last = dict(before, step=100, reward=5.0, greedy_reward=6.0, kl=0.2, rule_sampled=0.8,
                rule_greedy=0.85)
    last.update(after)
    return {"seed": 1, "wall_seconds": 200.0, "seconds": {"build": 10.0, "remax": 190.0},
            "sft": {"ppl_before": 700.0, "ppl_after": 14.0, "curve": [[0, 700.0], [10, 14.0]]},
            "reward_model": {"acc_before": 0.5, "acc_after": 0.88, "curve": [[0, 0.5], [9, 0.88]],
                             "acc_labels": 0.88, "acc_rule": 0.98, "rule_pairs": 900,
                             "label_rule_agreement": 0.9, "test_pairs": 1000},
            "remax": {"target_kl": 1.0, "before": before, "after": last, "curve": [before, last],
                      "kl_curve": [0.0, last["kl"]],
                      "train": [{"step": 1, "reward": 1.0, "baseline_reward": 1.2, "kl": 0.0}],
                      "examples": [{"prompt": "\n\nHuman: Hi?\n\nAssistant:", "sft_sampled": " a.",
                                    "sft_greedy": " the.", "remax_sampled": " kind.",
                                    "remax_greedy": " kind kind."}]}}


def test_thresholds_pass_and_each_failure_is_named():
    assert thresholds.check(fake_summary()) == []
    failing = {"rule_sampled": 0.49, "reward": 0.9, "kl": 1.2, "greedy_empty": 0.5,
               "rule_greedy": 0.3}
    summary = fake_summary(**failing)
    summary["wall_seconds"] = 700.0
    summary["reward_model"]["acc_rule"] = 0.8
    failures = thresholds.check(summary)
    assert len(failures) == 7
    for phrase in ("wall time", "agrees with the rule", "+25%", "eval reward did not rise",
                   "target_kl", "greedy answers are empty", "greedy answers fell"):
        assert any(phrase in f for f in failures), (phrase, failures)
    # +25 % exactly is enough
    assert thresholds.check(fake_summary(rule_sampled=0.5)) == []


def test_report_table_markdown_and_curves(tmp_path):
    summary = fake_summary()
    table = format_table(summary)
    assert "0.400" in table and "0.800 (+100%)" in table
    write_markdown(summary, ["wall time 700 s is not under 600 s"], str(tmp_path / "report.md"))
    text = (tmp_path / "report.md").read_text()
    assert "![curves](curves.png)" in text and "FAILED: wall time" in text
    assert "| 100 | 5.000 | 6.000 | 0.200 |" in text
    plot_curves(summary, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_progress_lines_split_at_carriage_returns():
    import io
    stream = io.BufferedReader(io.BytesIO(b"a\rremax epoch 1: 5%|x\rremax epoch 1: 9%|y\nend"))
    assert list(_lines(stream)) == ["a", "remax epoch 1: 5%|x", "remax epoch 1: 9%|y", "end"]


def stage_parse_args(stage):
    import importlib.util
    from demo.stages import ROOT, STAGE_DIRS
    path = os.path.join(ROOT, STAGE_DIRS[stage], "main.py")
    spec = importlib.util.spec_from_file_location(f"_demo_main_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_demo_flags_parse_in_each_stage():
    cfg = DemoConfig()
    args, out = sft_args(cfg, "/model", "/data/remax-demo/helpful-words")
    parsed = stage_parse_args(1)([str(a) for a in args])
    assert parsed.learning_rate == cfg.sft_learning_rate and parsed.output_dir == out
    args, out = reward_args(cfg, "/sft", "/data/remax-demo/helpful-words")
    parsed = stage_parse_args(2)([str(a) for a in args])
    assert parsed.num_padding_at_beginning == 1 and parsed.output_dir == out
    args, out = remax_args(cfg, "/sft", "/rm", "/data/remax-demo/helpful-words")
    parsed = stage_parse_args(3)([str(a) for a in args])
    assert parsed.actor_learning_rate == cfg.remax_learning_rate
    assert parsed.kl_ctl == cfg.kl_ctl and parsed.target_kl == cfg.target_kl
    assert parsed.save_answers and parsed.output_dir == out


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_shortened_demo_improves_the_policy(tmp_path):
    from demo.run_demo import run

    cfg = quick_config(DemoConfig(seed=1, output_dir=str(tmp_path)))
    summary, _ = run(cfg, check=False)
    sft, rm, remax = summary["sft"], summary["reward_model"], summary["remax"]
    before, after = remax["before"], remax["after"]
    assert sft["ppl_after"] < sft["ppl_before"] / 10
    assert rm["acc_after"] > rm["acc_before"] and rm["acc_rule"] > 0.75
    assert after["step"] > before["step"] == 0
    assert after["reward"] > before["reward"]
    assert after["rule_sampled"] > before["rule_sampled"]
    assert after["rule_greedy"] >= before["rule_greedy"]
    assert after["greedy_empty"] <= thresholds.MAX_EMPTY_GREEDY
    assert max(remax["kl_curve"]) < remax["target_kl"]
    for name in ("report.md", "curves.png", "summary.json"):
        assert os.path.exists(tmp_path / name), name
