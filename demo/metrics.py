"""The demo's evidence, computed independently of the learned reward model where it matters:

- the rule metric: mean share of helpful words in answers (utils.data.synthetic.helpful_share),
  read from the answers stage 3 saves at every evaluation (`--save_answers`);
- the reward model's agreement with the labels and with the rule on held-out pairs.
"""
import glob
import json
import os

from utils.data.synthetic import answer_words, helpful_share


def rule_metric(answers):
    """Mean helpful-word share over answers (an empty answer counts 0); 0.0 for no answers."""
    answers = list(answers)
    return sum(helpful_share(a) for a in answers) / len(answers) if answers else 0.0


def empty_share(answers):
    """Share of answers with no words at all."""
    answers = list(answers)
    return sum(not answer_words(a) for a in answers) / len(answers) if answers else 0.0


def read_saved_answers(remax_dir):
    """{global_step: [record, ...]} from `<remax_dir>/evaluation/rank_*.json` (all ranks)."""
    by_step = {}
    for path in sorted(glob.glob(os.path.join(remax_dir, "evaluation", "rank_*.json"))):
        with open(path, encoding="utf-8") as f:
            for record in json.load(f):
                by_step.setdefault(record["global_step"], []).append(record)
    return dict(sorted(by_step.items()))


def rule_curve(by_step):
    """Per evaluation step: the rule metric of sampled and greedy answers, the share of empty
    greedy answers and the number of answers -> {step: {...}}."""
    curve = {}
    for step, records in by_step.items():
        sampled = [r["answer"] for r in records]
        greedy = [r["greedy_answer"] for r in records]
        curve[step] = {"rule_sampled": rule_metric(sampled), "rule_greedy": rule_metric(greedy),
                       "greedy_empty": empty_share(greedy), "answers": len(records)}
    return curve


def pairwise_accuracies(chosen_scores, rejected_scores, rows):
    """Accuracy of score(chosen) > score(rejected) against the labels (every pair) and against
    the rule (pairs whose helpful shares differ, the better answer by the rule counts as right).

    chosen_scores, rejected_scores: sequences of floats aligned with `rows` (dicts with chosen,
    rejected). Returns {"acc_labels", "acc_rule", "rule_pairs", "label_rule_agreement"}."""
    label_right = rule_right = rule_pairs = labels_agree = 0
    for c_score, r_score, row in zip(chosen_scores, rejected_scores, rows):
        label_right += c_score > r_score
        c_rule, r_rule = helpful_share(row["chosen"]), helpful_share(row["rejected"])
        if c_rule != r_rule:
            rule_pairs += 1
            rule_right += (c_score > r_score) == (c_rule > r_rule)
            labels_agree += c_rule > r_rule
    n = max(len(rows), 1)
    return {"acc_labels": label_right / n, "acc_rule": rule_right / max(rule_pairs, 1),
            "rule_pairs": rule_pairs, "label_rule_agreement": labels_agree / max(rule_pairs, 1)}


def reward_model_scores(reward_dir, rows, max_seq_len, num_padding_at_beginning=1, batch_size=64):
    """End scores of prompt + chosen and prompt + rejected under the saved reward model, tokenised
    as stage 2 does (text + eos, right-padded to max_seq_len) -> (chosen [N], rejected [N])."""
    import torch

    from utils.data.data_utils import tokenize_phase2
    from utils.model.model_utils import create_critic_model, load_hf_tokenizer

    tokenizer = load_hf_tokenizer(reward_dir)
    model = create_critic_model(reward_dir, tokenizer, None, num_padding_at_beginning,
                                rlhf_training=True).eval()
    arrays = tokenize_phase2([r["prompt"] + r["chosen"] for r in rows],
                             [r["prompt"] + r["rejected"] for r in rows], tokenizer, max_seq_len,
                             tokenizer.eos_token)
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            ids = torch.cat([torch.from_numpy(arrays["chosen_ids"][part]),
                             torch.from_numpy(arrays["rejected_ids"][part])]).long()
            mask = torch.cat([torch.from_numpy(arrays["chosen_mask"][part]),
                              torch.from_numpy(arrays["rejected_mask"][part])]).long()
            out = model(input_ids=ids, attention_mask=mask)
            chosen += out["chosen_mean_scores"].float().tolist()
            rejected += out["rejected_mean_scores"].float().tolist()
    return chosen, rejected


def read_test_rows(data_dir):
    """The held-out (test split) rows of the demo dataset."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(data_dir, "data", "test-*.parquet")))
    return [row for f in files for row in pq.read_table(f).to_pylist()]
