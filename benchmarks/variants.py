"""The algorithms the benchmarks compare: one row each, as the stage-3 flags that select it."""

# name -> (--algo, the flags that make the row). K answers per prompt: 1 for ReMax (plus its
# greedy baseline) and PPO, 2 for RLOO and GRPO (the leave-one-out / group baselines need K >= 2).
VARIANTS = {
    "remax": ("remax", {}),
    "ppo-1ep": ("ppo", {"--ppo_epochs": 1}),
    "ppo-4ep": ("ppo", {"--ppo_epochs": 4}),
    "rloo-k2": ("rloo", {"--num_samples_per_prompt": 2}),
    "grpo-k2": ("grpo", {"--num_samples_per_prompt": 2}),
}
REFERENCE = "ppo-1ep"  # the ratios' denominator


def variant_flags(name, trained_zero_stage):
    """Stage-3 flags of variant `name`; PPO's critic gets the actor's ZeRO stage."""
    if name not in VARIANTS:
        raise ValueError(f"unknown algorithm row {name!r}; choose from {', '.join(VARIANTS)}")
    algo, extra = VARIANTS[name]
    flags = ["--algo", algo]
    for flag, value in extra.items():
        flags += [flag, value]
    if algo == "ppo":
        flags += ["--critic_zero_stage", trained_zero_stage]
    return flags
