"""The largest per-device batch that fits on a GPU, searched by doubling (or halving) on OOM."""


def largest_fitting_batch(fits, start, max_probes=3):
    """Probe `fits(batch) -> bool` at start, 2·start, 4·start, ... until one does not fit, or at
    start/2, start/4, ... while none fits; at most `max_probes` probes.

    Returns (largest batch seen to fit or None, bounded): `bounded` is True when a larger batch was
    seen not to fit, False when the search stopped at the probe limit (the answer is a lower bound).
    """
    best, batch, grow = None, start, None
    for _ in range(max_probes):
        if batch < 1:
            break
        if fits(batch):
            best = batch
            if grow is False:  # halving found a fit: the batch above it did not
                return best, True
            grow, batch = True, batch * 2
        else:
            if grow:
                return best, True
            grow, batch = False, batch // 2
    return best, False


def format_max_batch(best, bounded):
    """The table cell: "16", ">=32" (only a lower bound) or "none" (no probe fit)."""
    if best is None:
        return "none"
    return str(best) if bounded else f">={best}"
