"""How every dataset is split between the stages and shuffled, as pure functions of the split
proportions, the size and the seed (the original's seeded indices): one home for what the data
loading (data_utils.py) and the datasets' own eval splits (raw_datasets.py) both use."""
import numpy as np

from utils.errors import UserError


def get_shuffle_idx(seed, size):
    """Permutation of 0..size-1 drawn by numpy RandomState(seed) (uint32, int64 for huge sizes)."""
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(start=0, stop=size, step=1, dtype=dtype)
    np.random.RandomState(seed=seed).shuffle(shuffle_idx)
    return shuffle_idx


def split_boundaries(data_split, data_size):
    """Part boundaries [0, b_1, ..., data_size] for proportions like "2,4,4" (the original's rounding).

    Each part gets round(p_k * N) (Python's banker's rounding); the rounding error is then
    subtracted from every boundary but the first, so it lands in the first part.
    """
    try:
        proportions = [float(s) for s in data_split.split(",")]
    except ValueError:
        raise UserError(f"--data_split {data_split!r}: expected comma-separated numbers, e.g. 2,4,4") from None
    total = sum(proportions)
    if total <= 0 or any(p < 0 for p in proportions):
        raise UserError(f"--data_split {data_split!r}: proportions must be non-negative with a positive sum")
    boundaries = [0]
    for p in proportions:
        boundaries.append(boundaries[-1] + int(round(p / total * float(data_size))))
    diff = boundaries[-1] - data_size
    boundaries = [boundaries[0]] + [b - diff for b in boundaries[1:]]
    assert boundaries[-1] == data_size
    return boundaries


def split_indices(data_split, split_index, data_size, seed):
    """Row indices of part `split_index` of a dataset of `data_size` rows split by `data_split`.

    The original saved every part to <out>/<name>_seed<seed>_<split>_<data_split>_<part>.npy and
    reused those files even when the dataset changed size; we recompute in memory every time
    (cheap, and never stale).
    """
    boundaries = split_boundaries(data_split, data_size)
    shuffle_idx = get_shuffle_idx(seed, data_size)
    return shuffle_idx[boundaries[split_index]:boundaries[split_index + 1]].tolist()
