"""A synthetic preference dataset whose preference is a known, checkable rule.

Prompts are "Human: ... Assistant:" questions over many topics; answers mix *helpful* words from a
fixed set with neutral words. The rule: an answer is better when a larger share of its words is
helpful (`helpful_share`, which length alone cannot game). Pairs are labelled Bradley-Terry style
with noise, so a reward model can learn the rule but not reach 100 % against the noisy labels.

Rows follow the hh-rlhf / Dahoas schema (`prompt`, `response`, `chosen`, `rejected`) and are written
in the hub's layout (`data/train-00000-of-00001.parquet`, `data/test-...`), so they go through the
same loader as real data.
"""
import math
import os
import random

HELPFUL_WORDS = ("helpful", "clear", "useful", "kind", "honest", "careful", "accurate", "friendly",
                 "polite", "safe")
NEUTRAL_WORDS = ("the", "a", "of", "to", "and", "it", "is", "time", "day", "world", "thing", "way",
                 "place", "home", "work", "book", "story", "water", "tree", "river", "city", "sun",
                 "star", "sky", "bird", "fish", "dog", "cat", "garden", "market", "train", "plane",
                 "music", "art", "maybe", "perhaps", "random", "odd", "just", "some", "many", "other")
TOPICS = ("moon", "telescope", "frog", "birds", "history", "science", "music", "poem", "river",
          "computer", "phone", "garden", "kitchen", "doctor", "teacher", "school", "food", "city",
          "country", "math", "art", "story", "sun", "star", "sky", "tree", "water", "train", "car")
QUESTION_STARTS = ("Tell me about", "Explain", "Describe", "Write a short note about",
                   "Give me an idea about", "What do you know about", "Can you help with",
                   "Show me something about")


def helpful_share(text):
    """The rule: share of an answer's words that are helpful words (0..1)."""
    words = [w.strip(".,!?").lower() for w in text.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0
    return sum(w in HELPFUL_WORDS for w in words) / len(words)


def _answer(rng, share_mean):
    length = rng.randint(5, 10)
    share = min(1.0, max(0.0, rng.gauss(share_mean, 0.15)))
    words = [rng.choice(HELPFUL_WORDS) if rng.random() < share else rng.choice(NEUTRAL_WORDS)
             for _ in range(length)]
    return " " + " ".join(words).capitalize() + "."


def _prompt(rng):
    question = f"{rng.choice(QUESTION_STARTS)} the {rng.choice(TOPICS)} {rng.choice(NEUTRAL_WORDS)}"
    return f"\n\nHuman: {question}?\n\nAssistant:"


def make_rows(num_rows, seed, temperature=0.08, share_mean=0.3):
    """`num_rows` preference rows; chosen = the answer picked with P = sigmoid(Δshare / temperature)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = _prompt(rng)
        first, second = _answer(rng, share_mean), _answer(rng, share_mean)
        margin = (helpful_share(first) - helpful_share(second)) / temperature
        p_first = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, margin))))
        chosen, rejected = (first, second) if rng.random() < p_first else (second, first)
        rows.append({"prompt": prompt, "response": chosen, "chosen": chosen, "rejected": rejected})
    return rows


def write_hub_layout(root, dataset_id, train_rows, test_rows):
    """Write `<root>/<dataset_id>/data/{train,test}-00000-of-00001.parquet`; return the dataset dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = os.path.join(root, dataset_id, "data")
    os.makedirs(data_dir, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, os.path.join(data_dir, f"{split}-00000-of-00001.parquet"))
    return os.path.join(root, dataset_id)


def build_dataset(root, dataset_id="Dahoas/rm-static", num_train=2000, num_test=400, seed=0):
    return write_hub_layout(root, dataset_id, make_rows(num_train, seed),
                            make_rows(num_test, seed + 1))
