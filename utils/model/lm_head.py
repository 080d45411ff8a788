"""The LM head in float32 for a half-precision model.

In fp16/bf16 the head's product is rounded to the half type before any log-softmax sees it: at a
hidden size of 4096 and a vocabulary of 32000, bf16 logits carry a per-token log-prob noise of
about 0.016, against true policy/reference log-ratios of about 0.002, so the KL penalty and the
importance ratios are mostly rounding. `float32_lm_head` makes the head compute
`hidden.float() @ weight.float().T` instead (fp32 logits, gradients flowing back to the half
weights as before). The module is still called as a module, so ZeRO-3's hooks gather and release
its weight around each call; with the chunked scoring only one chunk's fp32 logits exist at once.
"""
import functools

import torch
import torch.nn.functional as F


def float32_linear(linear, hidden):
    """`linear(hidden)` (an nn.Linear) computed in float32: input, weight and bias upcast, so no
    product is rounded to a half dtype; gradients reach the half weights through the upcasts.
    Also the reward model's value head (reward_model.Float32Head)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(hidden.float(), linear.weight.float(), bias)


def float32_lm_head(module):
    """Make the output embedding of `module` (a Hugging Face causal LM) compute in float32.
    Returns a note for the log: what was done, or why nothing was (already fp32, no plain Linear
    head). The change lives on the head instance (an instance `forward`), for the run."""
    head = module.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"LM head kept as is (a {type(head).__name__}, not a plain Linear)"
    if head.weight.dtype == torch.float32:
        return "LM head already float32"
    if "forward" not in head.__dict__:
        head.forward = functools.partial(float32_linear, head)
    return f"LM head computes float32 logits from {head.weight.dtype} weights"
