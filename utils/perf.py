"""Throughput and TFLOPs reporting (Megatron's formula, as the original)."""


def model_shape(config):
    """(layers, hidden, vocab) of a HF config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    vocab = getattr(config, "vocab_size", None)
    if not (layers and hidden and vocab):
        raise ValueError(f"cannot read layers/hidden/vocab from {type(config).__name__}")
    return layers, hidden, vocab


def calculate_flops(passes, batch_size, seq_len, config):
    """24 f B s l h^2 (1 + s/(6h) + V/(16 l h)); f = 3 (fwd + bwd) or 4 with checkpointing."""
    layers, hidden, vocab = model_shape(config)
    return 24 * passes * batch_size * seq_len * layers * hidden ** 2 * (
        1.0 + seq_len / (6.0 * hidden) + vocab / (16.0 * layers * hidden))


def training_passes(gradient_checkpointing, lora_dim, hidden):
    passes = 4 if gradient_checkpointing else 3
    if lora_dim > 0:
        passes -= 1 - 2 * lora_dim / hidden
    return passes


def throughput_line(config, num_params, seconds, global_batch, seq_len, passes, world_size):
    """One line for a training step. Unlike the original, the batch is the global one (the
    original divided a per-device batch by the world size, under-reporting multi-GPU runs)."""
    flops = calculate_flops(passes, global_batch, seq_len, config)
    tflops = flops / (seconds * world_size * 1e12) if seconds > 0 else 0.0
    params = f"{num_params / 1e9:.3f} B" if num_params else "NA"
    return (f"Model Parameters: {params}, Latency: {seconds:.2f}s, TFLOPs: {tflops:.2f}, "
            f"Samples/sec: {global_batch / max(seconds, 1e-9):.2f}, "
            f"Time/seq {seconds / max(global_batch, 1):.2f}s, Batch Size: {global_batch}, "
            f"Sequence Length: {seq_len}")
