"""What float32 LM-head logits buy and cost for a half-precision model (utils/model/lm_head.py).

    python -m benchmarks.lm_head_precision            # hidden 4096, vocabulary 32000 (Llama-2-7B's head)
    python -m benchmarks.lm_head_precision --quick    # a small head, seconds

For random bf16 final hidden states and a random bf16 head of the given sizes, the chunked scoring
of stage 3 (step3_rlhf_finetuning/rl_math.py `chunked_answer_scores`, actor and reference) runs
with the head in bf16 (the original: logits rounded to bf16 before the float32 log-softmax) and
with the float32 head (the default). Reported per mode:
- the error of the per-token log-probs and of the policy/reference log-ratio against a float64
  computation from the same bf16 weights and hidden states (mean and max |error|), next to the
  mean |log-ratio| itself (the reference head is the actor's plus a small perturbation, so the
  true ratios are small, as in RLHF);
- the time of the scoring forward (actor + reference, no grad) and of the training forward +
  backward (actor, with grad), median of a few repeats, on this CPU in bf16.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "step3_rlhf_finetuning"))
from rl_math import chunked_answer_scores  # noqa: E402
from utils.model.lm_head import float32_lm_head  # noqa: E402


class Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.head = torch.nn.Linear(weight.size(1), weight.size(0), bias=False,
                                    dtype=weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(weight)

    def get_output_embeddings(self):
        return self.head


def exact_logprobs(hidden, weight, labels):
    logits = hidden.double() @ weight.double().T
    logp = logits.log_softmax(-1)[:, :-1]
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def timed(fn, repeats):
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(hidden_size, vocab, rows, answer_len, chunks, repeats, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * hidden_size ** -0.5)
    ref_weight = weight + 0.01 * hidden_size ** -0.5 * torch.randn(vocab, hidden_size,
                                                                   generator=generator)
    weight, ref_weight = weight.bfloat16(), ref_weight.bfloat16()
    hidden = (torch.randn(rows, answer_len + 1, hidden_size, generator=generator) * 2).bfloat16()
    labels = torch.randint(vocab, (rows, answer_len), generator=generator)
    true_actor = exact_logprobs(hidden, weight, labels)
    true_ratio = true_actor - exact_logprobs(hidden, ref_weight, labels)
    results = []
    for mode in ("bf16", "fp32"):
        actor, ref = Head(weight), Head(ref_weight)
        if mode == "fp32":
            float32_lm_head(actor), float32_lm_head(ref)
        with torch.no_grad():
            scores = chunked_answer_scores(hidden, actor.head, labels, chunks, hidden, ref.head)
        ratio = scores["logprobs"].double() - scores["ref_logprobs"].double()
        logprob_error = (scores["logprobs"].double() - true_actor).abs()
        ratio_error = (ratio - true_ratio).abs()

        def scoring():
            with torch.no_grad():
                chunked_answer_scores(hidden, actor.head, labels, chunks, hidden, ref.head)

        def training():
            grad_hidden = hidden.clone().requires_grad_(True)
            out = chunked_answer_scores(grad_hidden, actor.head, labels, chunks)
            out["logprobs"].sum().backward()
            actor.head.weight.grad = None

        results.append({"mode": mode, "logprob_error_mean": logprob_error.mean().item(),
                        "logprob_error_max": logprob_error.max().item(),
                        "ratio_error_mean": ratio_error.mean().item(),
                        "ratio_error_max": ratio_error.max().item(),
                        "true_ratio_mean_abs": true_ratio.abs().mean().item(),
                        "scoring_s": timed(scoring, repeats), "training_s": timed(training, repeats)})
    return results


def format_table(results, shape):
    bf16 = next(r for r in results if r["mode"] == "bf16")
    lines = [f"LM head {shape['hidden']} x {shape['vocab']}, {shape['rows']} rows x "
             f"{shape['answer_len']} answer tokens, {shape['chunks']} chunk(s), bf16 weights and "
             f"hidden states, CPU, {torch.get_num_threads()} threads",
             "",
             "| logits | log-prob error mean / max | log-ratio error mean / max | true mean |log-ratio| "
             "| scoring s (actor + ref) | training fwd+bwd s | time vs bf16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['logprob_error_mean']:.2e} / {r['logprob_error_max']:.2e} "
                     f"| {r['ratio_error_mean']:.2e} / {r['ratio_error_max']:.2e} "
                     f"| {r['true_ratio_mean_abs']:.2e} | {r['scoring_s']:.3f} | "
                     f"{r['training_s']:.3f} | "
                     f"{(r['scoring_s'] + r['training_s']) / (bf16['scoring_s'] + bf16['training_s']):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="A small head (seconds).")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--answer_len", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.vocab, args.rows, args.answer_len, args.repeats = 256, 2048, 2, 16, 1
    shape = {"hidden": args.hidden, "vocab": args.vocab, "rows": args.rows,
             "answer_len": args.answer_len, "chunks": args.chunks}
    results = measure(args.hidden, args.vocab, args.rows, args.answer_len, args.chunks,
                      args.repeats)
    print(format_table(results, shape))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
