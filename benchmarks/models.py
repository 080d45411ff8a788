"""The benchmark's shared models, built once into a cache directory: an OPT-family actor with a
large vocabulary (so that model states, not the Python runtime, dominate memory) and a reward
model of the same size in the stage-2 checkpoint layout stage 3 reads. Random weights: only the
sizes matter for speed and memory.

The tokenizer is the tiny one of utils/model/tiny_models.py (about a thousand BPE tokens); the
embedding has `vocab_size` rows, more than the tokenizer needs, which stage 3 accepts (it only ever
grows an embedding to fit the tokenizer).
"""
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass

from utils.data import synthetic
from utils.model.tiny_models import build_tiny_checkpoint

# pad == eos == "</s>" and OPT's BOS is "</s>" too: one pad in front of every sequence.
NUM_PADDING_AT_BEGINNING = 1


@dataclass(frozen=True)
class ModelSize:
    """The default: 29.7M parameters, 16.8M of them the embedding, sized to keep a CPU run of
    every row under 10 minutes on 2 cores."""
    vocab_size: int = 32768
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    seed: int = 1234

    @property
    def name(self):
        return (f"opt-{self.hidden_size}x{self.num_layers}-h{self.num_heads}-v{self.vocab_size}"
                f"-seed{self.seed}")


def parameter_count(size):
    """Parameters of the OPT causal LM of `size` (tied input/output embedding, 4h FFN, learned
    positions of 512 + 2 rows): 12 h² + 13 h per layer, V h + 514 h, and the final layer norm."""
    h = size.hidden_size
    per_layer = 12 * h * h + 13 * h
    return size.num_layers * per_layer + size.vocab_size * h + 514 * h + 2 * h


def build_models(cache_dir, size):
    """(actor_dir, reward_dir) under `cache_dir/<size.name>`; reused when already complete."""
    root = os.path.join(cache_dir, size.name)
    actor_dir, reward_dir = os.path.join(root, "actor"), os.path.join(root, "reward")
    marker = os.path.join(root, "benchmark_models.json")  # written last: the build completed
    if os.path.exists(marker):
        return actor_dir, reward_dir
    shutil.rmtree(root, ignore_errors=True)
    model, tokenizer = _random_actor(root, size)
    model.save_pretrained(actor_dir)
    tokenizer.save_pretrained(actor_dir)
    _save_random_reward_model(model.config, tokenizer, reward_dir, size.seed + 1)
    with open(marker, "w") as f:
        json.dump(asdict(size), f)
    return actor_dir, reward_dir


def build_data(cache_dir, num_train=2000, num_test=400, questions_per_prompt=3):
    """The synthetic preference rows (utils/data/synthetic.py) with prompts of
    `questions_per_prompt` questions (about 30 tokens for 3), in the hub layout; cached."""
    data_dir = os.path.join(cache_dir, "data", f"q{questions_per_prompt}", "Dahoas", "rm-static")
    if not os.path.exists(os.path.join(data_dir, "data", "test-00000-of-00001.parquet")):
        rng = random.Random(0)
        train, test = (synthetic.make_rows(n, seed) for n, seed in ((num_train, 0), (num_test, 1)))
        for row in train + test:
            row["prompt"] = long_prompt(rng, questions_per_prompt)
        synthetic.write_hub_layout(os.path.dirname(os.path.dirname(data_dir)), "Dahoas/rm-static",
                                   train, test)
    return data_dir


# Prompt lengths in tokens and their shares: hh-rlhf's skew (most prompts short, a few long).
VARIED_PROMPT_LENGTHS = ((16, 0.40), (32, 0.25), (64, 0.20), (128, 0.10), (256, 0.05))


def build_varied_data(cache_dir, tokenizer_dir, num_train=2000, num_test=400):
    """The synthetic preference rows with prompts of VARIED_PROMPT_LENGTHS tokens (BOS included,
    by the tokenizer in `tokenizer_dir`), drawn row by row in those shares; cached."""
    data_dir = os.path.join(cache_dir, "data", "varied", "Dahoas", "rm-static")
    if not os.path.exists(os.path.join(data_dir, "data", "test-00000-of-00001.parquet")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        rng = random.Random(0)
        lengths, shares = zip(*VARIED_PROMPT_LENGTHS)
        train, test = (synthetic.make_rows(n, seed) for n, seed in ((num_train, 0), (num_test, 1)))
        for row in train + test:
            row["prompt"] = prompt_of_length(rng, tokenizer, rng.choices(lengths, shares)[0])
        synthetic.write_hub_layout(os.path.dirname(os.path.dirname(data_dir)), "Dahoas/rm-static",
                                   train, test)
    return data_dir


def prompt_of_length(rng, tokenizer, tokens):
    """A prompt of questions ("Human: Explain the frog? ...") with at most `tokens` tokens, as long
    as whole words allow (within a few tokens of it)."""
    words, text = [], long_prompt(rng, 0)
    while True:
        question = long_prompt(rng, 1).split("Human: ", 1)[1].split("\n")[0].split()
        for word in question:
            candidate = f"\n\nHuman: {' '.join(words + [word])}\n\nAssistant:"
            if len(tokenizer(candidate)["input_ids"]) > tokens:
                return text
            words.append(word)
            text = candidate


def long_prompt(rng, questions):
    """The demo's questions, several in a row: "Human: Explain the frog? Describe the sun? ..."."""
    asked = " ".join(f"{rng.choice(synthetic.QUESTION_STARTS)} the {rng.choice(synthetic.TOPICS)}?"
                     for _ in range(questions))
    return f"\n\nHuman: {asked}\n\nAssistant:"


def _random_actor(root, size):
    """The tiny-models OPT of `size`, rebuilt from its config with `size.vocab_size` rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # A 64-wide template gives the tokenizer and the family's config without building the big
    # model twice.
    template = build_tiny_checkpoint("opt", os.path.join(root, "template"), vocab_size=1024)
    config = AutoConfig.from_pretrained(template)
    config.update({"vocab_size": size.vocab_size, "hidden_size": size.hidden_size,
                   "word_embed_proj_dim": size.hidden_size, "ffn_dim": 4 * size.hidden_size,
                   "num_hidden_layers": size.num_layers, "num_attention_heads": size.num_heads})
    tokenizer = AutoTokenizer.from_pretrained(template)
    if len(tokenizer) > size.vocab_size:
        raise ValueError(f"vocab_size {size.vocab_size} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    torch.manual_seed(size.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig.from_pretrained(template)
    shutil.rmtree(template)
    return model, tokenizer


def _save_random_reward_model(config, tokenizer, reward_dir, seed):
    import torch
    from transformers import AutoModel

    from utils.model.model_utils import save_reward_model
    from utils.model.reward_model import RewardModel

    torch.manual_seed(seed)
    reward = RewardModel(AutoModel.from_config(config), tokenizer.eos_token_id,
                         NUM_PADDING_AT_BEGINNING)
    save_reward_model(reward, tokenizer, reward_dir, NUM_PADDING_AT_BEGINNING, rank=0)

