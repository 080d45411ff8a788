"""The decoding floor: the matrix products one `generate` call cannot avoid, timed alone.

For every decoding step of `answer_len` new tokens over `rows` rows: in each layer the q, k, v and
output projections and the two MLP products of one position, the attention products against the
cache at its length then (prompt + tokens so far), and the LM head on one position. Timed in this
process with random weights of the model's sizes, the same dtype and threads as the run, so a
`generate` at that floor would spend all its time in these products (no cache copies, sampling,
masks or Python)."""
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeShape:
    rows: int
    prompt_len: int
    answer_len: int


def decode_floor_seconds(size, shape, repeats=3, dtype=torch.float32):
    """Median over `repeats` of the products' time for one decode of `shape` by a model of `size`
    (benchmarks.models.ModelSize: hidden, layers, heads, vocabulary)."""
    hidden, heads = size.hidden_size, size.num_heads
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(0)
    weight = lambda *dims: torch.randn(*dims, generator=generator, dtype=dtype) * 0.02  # noqa: E731
    layers = [{name: weight(hidden, out) for name, out in
               (("q", hidden), ("k", hidden), ("v", hidden), ("o", hidden), ("fc1", 4 * hidden))}
              | {"fc2": weight(4 * hidden, hidden)} for _ in range(size.num_layers)]
    head = weight(hidden, size.vocab_size)
    max_len = shape.prompt_len + shape.answer_len
    keys = weight(shape.rows, heads, max_len, head_dim)
    values = weight(shape.rows, heads, max_len, head_dim)
    x = weight(shape.rows, hidden)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for step in range(shape.answer_len):
                cache = shape.prompt_len + step + 1
                for layer in layers:
                    q = (x @ layer["q"]).view(shape.rows, heads, 1, head_dim)
                    x @ layer["k"], x @ layer["v"]
                    scores = q @ keys[:, :, :cache].transpose(-1, -2)           # [rows, heads, 1, cache]
                    attended = (scores @ values[:, :, :cache]).view(shape.rows, hidden)
                    y = attended @ layer["o"]
                    (y @ layer["fc1"]) @ layer["fc2"]
                x @ head                                                # the LM head, one position
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
