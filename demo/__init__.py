"""`make demo`: SFT, reward model and ReMax on a synthetic preference task, on the CPU."""
