"""A synthetic preference dataset whose preference is a known, checkable rule.

Prompts are "Human: ... Assistant:" questions over many topics; answers mix *helpful* words from a
fixed set with neutral words (drawn Zipf-like, as in real text: "the" is far more common than
"garden"). The rule: an answer is better when a larger share of its words is helpful
(`helpful_share`, which length alone cannot game). Pairs are labelled Bradley-Terry style with
noise, so a reward model can learn the rule but not reach 100 % against the noisy labels.

The chosen answers (what SFT imitates) hold about a third helpful words, so an SFT policy is
mediocre at the rule and RLHF has room to improve it.

Rows follow the hh-rlhf / Dahoas schema (`prompt`, `response`, `chosen`, `rejected`) and are written
in the hub's layout (`data/train-00000-of-00001.parquet`, `data/test-...`), so they go through the
same loader as real data.
"""
import math
import os
import random

DEMO_DATASET_ID = "remax-demo/helpful-words"

HELPFUL_WORDS = ("helpful", "clear", "useful", "kind", "honest", "careful", "accurate", "friendly",
                 "polite", "safe")
# Most frequent first: word i is drawn with weight 1 / (i + 1) ** ZIPF_EXPONENT.
NEUTRAL_WORDS = ("the", "a", "and", "of", "it", "is", "to", "some", "many", "just", "time", "day",
                 "world", "thing", "way", "place", "home", "work", "book", "story", "water", "tree",
                 "river", "city", "sun", "star", "sky", "bird", "fish", "dog", "cat", "garden",
                 "market", "train", "plane", "music", "art", "maybe", "perhaps", "random", "odd",
                 "other")
ZIPF_EXPONENT = 1.0
TOPICS = ("moon", "telescope", "frog", "birds", "history", "science", "music", "poem", "river",
          "computer", "phone", "garden", "kitchen", "doctor", "teacher", "school", "food", "city",
          "country", "math", "art", "story", "sun", "star", "sky", "tree", "water", "train", "car")
QUESTION_STARTS = ("Tell me about", "Explain", "Describe", "Write a short note about",
                   "Give me an idea about", "What do you know about", "Can you help with",
                   "Show me something about")
_NEUTRAL_WEIGHTS = [1.0 / (i + 1) ** ZIPF_EXPONENT for i in range(len(NEUTRAL_WORDS))]


def answer_words(text):
    """The words of an answer, lower-cased, punctuation stripped."""
    words = [w.strip(".,!?;:").lower() for w in text.split()]
    return [w for w in words if w]


def helpful_share(text):
    """The rule: share of an answer's words that are helpful words (0..1; 0 for no words)."""
    words = answer_words(text)
    if not words:
        return 0.0
    return sum(w in HELPFUL_WORDS for w in words) / len(words)


def _answer(rng, share_mean, share_sd, min_words, max_words, helpful_first):
    length = rng.randint(min_words, max_words)
    share = min(1.0, max(0.0, rng.gauss(share_mean, share_sd)))
    helpful = [rng.random() < share for _ in range(length)]
    if helpful_first:
        helpful.sort(reverse=True)
    words = [rng.choice(HELPFUL_WORDS) if is_helpful
             else rng.choices(NEUTRAL_WORDS, _NEUTRAL_WEIGHTS)[0] for is_helpful in helpful]
    return " " + " ".join(words) + "."


def _prompt(rng):
    return f"\n\nHuman: {rng.choice(QUESTION_STARTS)} the {rng.choice(TOPICS)}?\n\nAssistant:"


def preference_probability(first, second, temperature):
    """P(first is chosen) = sigmoid((share(first) - share(second)) / temperature)."""
    margin = (helpful_share(first) - helpful_share(second)) / temperature
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, margin))))


def make_rows(num_rows, seed, temperature=0.08, share_mean=0.25, share_sd=0.15, min_words=5,
              max_words=9, helpful_first=True):
    """`num_rows` preference rows; chosen = the answer picked with P = sigmoid(Δshare / temperature).

    Each answer has 5-9 words, each helpful with a per-answer probability ~ N(share_mean, share_sd).
    `helpful_first` puts an answer's helpful words before its neutral ones (" kind clear the sun
    of a tree."): the word order the rule ignores, but one that gives greedy decoding a typical
    answer (a few helpful words, then neutral ones) rather than the single most common word
    repeated, so ReMax's greedy baseline sits near the sampled answers' reward."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = _prompt(rng)
        first, second = (_answer(rng, share_mean, share_sd, min_words, max_words, helpful_first)
                         for _ in range(2))
        if rng.random() < preference_probability(first, second, temperature):
            chosen, rejected = first, second
        else:
            chosen, rejected = second, first
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


def build_dataset(root, dataset_id="Dahoas/rm-static", num_train=2000, num_test=400, seed=0,
                  **row_options):
    """Train and test rows (test drawn with seed + 1) in the hub layout; return the dataset dir.
    `row_options` go to `make_rows` (temperature, share_mean, ...)."""
    return write_hub_layout(root, dataset_id, make_rows(num_train, seed, **row_options),
                            make_rows(num_test, seed + 1, **row_options))
