"""Step 1 of the demo: the preference data, tokenizer and tiny model, built once and cached."""
import hashlib
import json
import os

from utils.data import synthetic


def build_data(cfg):
    """The synthetic preference set in the hub layout under `<cache>/data/<dataset id>`; reused
    when the files exist and were built with the same settings."""
    root = os.path.join(cfg.cache_dir, "data")
    data_dir = os.path.join(root, synthetic.DEMO_DATASET_ID)
    # The first rows stand for the generator's code: a changed generator rebuilds the files.
    probe = hashlib.sha256(json.dumps(synthetic.make_rows(20, cfg.data_seed)).encode()).hexdigest()
    spec = {"num_train": cfg.num_train, "num_test": cfg.num_test, "seed": cfg.data_seed,
            "generator": probe}
    marker = os.path.join(data_dir, "demo_data.json")
    if _read_json(marker) == spec:
        return data_dir, False
    synthetic.build_dataset(root, synthetic.DEMO_DATASET_ID, cfg.num_train, cfg.num_test,
                            seed=cfg.data_seed)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return data_dir, True


def build_model(cfg):
    """The tiny OPT (tokenizer trained here, random weights seeded by cfg.seed); cached."""
    from utils.model.tiny_models import build_tiny_checkpoint

    path = cfg.model_dir
    built = not os.path.exists(os.path.join(path, "tiny_model.json"))
    build_tiny_checkpoint("opt", path, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          num_layers=cfg.num_layers, num_heads=cfg.num_heads, seed=cfg.seed)
    return path, built


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
