"""The rows the benchmarks compare, each as the stage-3 flags that select it: the algorithms, and
ReMax with its efficiency features switched off (all of them: the faithful path; or one at a time:
the ablation)."""

# Each efficiency feature of stage 3 (on by default) and the flag that switches it off.
EFFICIENCY_FLAGS = {
    "one generation pass": "--separate_baseline_generation",
    "one reward pass": "--separate_baseline_scoring",
    "one actor forward": "--separate_scoring_forward",
    "prompts trimmed": "--pad_prompts_to_max_len",
    "chunked logits": "--unchunked_logits",
    "fused sampling": "--hf_sampling",
}

# name -> (--algo, {flag: value, or None for a switch}). K answers per prompt: 1 for ReMax (plus
# its greedy baseline) and PPO, 2 for RLOO and GRPO (the leave-one-out / group baselines need
# K >= 2).
VARIANTS = {
    "remax": ("remax", {}),
    "ppo-1ep": ("ppo", {"--ppo_epochs": 1}),
    "ppo-4ep": ("ppo", {"--ppo_epochs": 4}),
    "rloo-k2": ("rloo", {"--num_samples_per_prompt": 2}),
    "grpo-k2": ("grpo", {"--num_samples_per_prompt": 2}),
}
ALGORITHM_ROWS = tuple(VARIANTS)
REFERENCE = "ppo-1ep"  # the algorithm table's ratios' denominator
FAITHFUL = "remax-faithful"
VARIANTS[FAITHFUL] = ("remax", dict.fromkeys(EFFICIENCY_FLAGS.values()))
ABLATIONS = {}   # "remax-no-<feature>" -> the feature it switches off
for feature, flag in EFFICIENCY_FLAGS.items():
    name = "remax-no-" + feature.replace(" ", "-")
    VARIANTS[name] = ("remax", {flag: None})
    ABLATIONS[name] = feature


def variant_flags(name, trained_zero_stage):
    """Stage-3 flags of variant `name`; PPO's critic gets the actor's ZeRO stage."""
    if name not in VARIANTS:
        raise ValueError(f"unknown benchmark row {name!r}; choose from {', '.join(VARIANTS)}")
    algo, extra = VARIANTS[name]
    flags = ["--algo", algo]
    for flag, value in extra.items():
        flags += [flag] if value is None else [flag, value]
    if algo == "ppo":
        flags += ["--critic_zero_stage", trained_zero_stage]
    return flags
