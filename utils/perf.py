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


# The peaks before the last reset (a reset makes the kernel and the CUDA allocator forget them):
# the CPU process's resident set in MiB, the CUDA allocator's allocated and reserved bytes.
_EARLIER_PEAKS = {"rss_mib": 0.0, "cuda_allocated": 0, "cuda_reserved": 0}


def _on_cuda():
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak_memory():
    """Start a new peak-memory window: on a GPU the allocator's peak, on the CPU the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs; where that is refused, the
    window keeps the process's whole-run peak). A reset also lowers what the process reports at
    exit (ru_maxrss, torch.cuda.max_memory_allocated), so the earlier peaks are kept here:
    `process_peak_mib` and `earlier_cuda_peaks` give the whole run's."""
    import torch

    if _on_cuda():
        _EARLIER_PEAKS["cuda_allocated"] = max(_EARLIER_PEAKS["cuda_allocated"],
                                               torch.cuda.max_memory_allocated())
        _EARLIER_PEAKS["cuda_reserved"] = max(_EARLIER_PEAKS["cuda_reserved"],
                                              torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()
        return
    _EARLIER_PEAKS["rss_mib"] = max(_EARLIER_PEAKS["rss_mib"], _vm_hwm_mib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def earlier_cuda_peaks():
    """(allocated, reserved) bytes: the CUDA allocator's peaks before the last reset."""
    return _EARLIER_PEAKS["cuda_allocated"], _EARLIER_PEAKS["cuda_reserved"]


def peak_memory_mib():
    """The peak since `reset_peak_memory`: GPU max_memory_allocated, else the CPU process's VmHWM
    (which includes memory the allocator kept from before the window); NaN when unreadable."""
    import torch

    if _on_cuda():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _vm_hwm_mib()


def current_memory_mib():
    """Memory in use now: GPU memory_allocated, else the CPU process's resident set (VmRSS)."""
    import torch

    if _on_cuda():
        return torch.cuda.memory_allocated() / 2 ** 20
    return _proc_status_mib("VmRSS:")


def process_peak_mib():
    """The CPU process's peak resident set over the whole run so far (MiB; NaN if unreadable)."""
    return max(_EARLIER_PEAKS["rss_mib"], _vm_hwm_mib())


def run_reserved_peak_mib():
    """"Does it fit": the most memory this process held at once over the whole run so far (MiB):
    on a GPU the CUDA allocator's peak reserved bytes (allocated + its cache: what the device
    must have), on the CPU the process's peak resident set."""
    import torch

    if _on_cuda():
        return max(_EARLIER_PEAKS["cuda_reserved"], torch.cuda.max_memory_reserved()) / 2 ** 20
    return process_peak_mib()


def _vm_hwm_mib():
    return _proc_status_mib("VmHWM:")


def _proc_status_mib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
