"""Compare a baseline and a fine-tuned causal LM on six fixed prompts.

    python prompt_eval.py --model_name_or_path_baseline /models/facebook/opt-1.3b \
        --model_name_or_path_finetune ./log/step1_sft-facebook_opt-1.3b-... --language English

For each prompt it prints the baseline's greedy answer, the fine-tuned model's greedy answer (the
comparison the original's `main` made) and a sampled answer of the fine-tuned model (what the
original's entry point printed). Differences from the original, on purpose:
* the device comes from DeepSpeed's accelerator (the original hard-coded cuda:0), so it runs on CPU;
* the attention mask and the pad id are passed to `generate` (the original passed neither);
* greedy decoding returns one sequence (num_return_sequences > 1 is an error for greedy search in
  current transformers, and the copies would be identical); sampling returns --num_return_sequences;
* --seed makes the sampled answers reproducible (the original was unseeded: default None).
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from utils import arguments  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.model.model_utils import check_model_dir, create_hf_model, load_hf_tokenizer  # noqa: E402

BASELINE_GREEDY_HEADER = "==========Baseline: Greedy========="
FINETUNE_GREEDY_HEADER = "==========finetune: Greedy========="
FINETUNE_SAMPLE_HEADER = "==========finetune: Sample========="
PROMPT_END = "====================prompt end============================="

PROMPTS = {
    "English": [
        "Human: Please tell me about Microsoft in a few sentence? Assistant:",
        "Human: Explain the moon landing to a 6 year old in a few sentences. Assistant:",
        "Human: Write a short poem about a wise frog. Assistant:",
        "Human: Who was president of the United States in 1955? Assistant:",
        "Human: How does a telescope work? Assistant:",
        "Human: Why do birds migrate south for the winter? Assistant:",
    ],
    "Chinese": [
        "Human: 请用几句话给我讲讲微软公司。 Assistant:",
        "Human: 用几句话向一个六岁的孩子讲解人类登月。 Assistant:",
        "Human: 写一首关于一只聪明青蛙的小诗。 Assistant:",
        "Human: 1955年的美国总统是谁? Assistant:",
        "Human: 望远镜是怎样工作的? Assistant:",
        "Human: 鸟儿为什么在冬天飞往南方? Assistant:",
    ],
    "Japanese": [
        "Human: マイクロソフトについて数文で教えてください。 Assistant:",
        "Human: 月面着陸を6歳の子どもにもわかるように数文で説明してください。 Assistant:",
        "Human: 賢いカエルについての短い詩を書いてください。 Assistant:",
        "Human: 1955年のアメリカ合衆国大統領は誰でしたか? Assistant:",
        "Human: 望遠鏡はどのような仕組みで動くのですか? Assistant:",
        "Human: 鳥はなぜ冬になると南へ渡るのですか? Assistant:",
    ],
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = arguments.new_parser("Greedy and sampled answers of a baseline and a fine-tuned model "
                                  "on fixed prompts")
    parser.add_argument("--model_name_or_path_baseline", type=str, required=True,
                        help="The model before fine-tuning (its tokenizer is used for both).")
    parser.add_argument("--model_name_or_path_finetune", type=str, required=True,
                        help="The fine-tuned model (e.g. the stage-1 output directory).")
    parser.add_argument("--num_beams", type=int, default=1, help="Beams of the sampled answers.")
    parser.add_argument("--num_beam_groups", type=int, default=1,
                        help="Accepted for compatibility; unused, as in the original.")
    parser.add_argument("--top_k", type=int, default=4,
                        help="Contrastive search's top_k; unused, as in the original.")
    parser.add_argument("--penalty_alpha", type=float, default=0.6,
                        help="Contrastive search's penalty; unused, as in the original.")
    parser.add_argument("--num_return_sequences", type=int, default=1,
                        help="Sampled answers per prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=100,
                        help="Maximum number of tokens generated per answer.")
    parser.add_argument("--language", type=str, default="English", choices=sorted(PROMPTS),
                        help="Language of the six prompts.")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed of the sampled answers (unseeded by default, as the original).")
    parser.add_argument("--dtype", type=str, default="fp32", choices=sorted(DTYPES),
                        help="Precision the models are run in.")
    args = parser.parse_args(argv)
    if args.num_beams > 1 and args.num_return_sequences > args.num_beams:
        parser.error(f"--num_return_sequences ({args.num_return_sequences}) cannot exceed "
                     f"--num_beams ({args.num_beams}) for beam sampling")
    return args


def get_device():
    from deepspeed import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def load_model(path, tokenizer, device, dtype=torch.float32):
    model = create_hf_model(AutoModelForCausalLM, path, tokenizer, None)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def generate(model, tokenizer, inputs, max_new_tokens, do_sample, num_beams=1, num_return_sequences=1):
    """Decoded `prompt + answer` texts (special tokens kept, so an answer's closing eos shows)."""
    output_ids = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens, do_sample=do_sample,
        num_beams=num_beams, num_return_sequences=num_return_sequences)
    return tokenizer.batch_decode(output_ids, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def print_outputs(texts):
    for text in texts:
        print()
        print(text)
        print()


def prompt_eval(args, baseline, finetuned, tokenizer, device, prompts):
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        print(BASELINE_GREEDY_HEADER)
        print_outputs(generate(baseline, tokenizer, inputs, args.max_new_tokens, do_sample=False))
        print(FINETUNE_GREEDY_HEADER)
        print_outputs(generate(finetuned, tokenizer, inputs, args.max_new_tokens, do_sample=False))
        print(FINETUNE_SAMPLE_HEADER)
        print_outputs(generate(finetuned, tokenizer, inputs, args.max_new_tokens, do_sample=True,
                               num_beams=args.num_beams,
                               num_return_sequences=args.num_return_sequences))
        print(PROMPT_END)
        print()
        print(flush=True)


def main(argv=None):
    args = parse_args(argv)
    check_model_dir(args.model_name_or_path_baseline, "--model_name_or_path_baseline")
    check_model_dir(args.model_name_or_path_finetune, "--model_name_or_path_finetune",
                    need_tokenizer=False)  # the baseline's tokenizer is used for both
    device = get_device()
    if args.seed is not None:
        from utils.utils import set_random_seed

        set_random_seed(args.seed)
    tokenizer = load_hf_tokenizer(args.model_name_or_path_baseline)
    dtype = DTYPES[args.dtype]
    baseline = load_model(args.model_name_or_path_baseline, tokenizer, device, dtype)
    finetuned = load_model(args.model_name_or_path_finetune, tokenizer, device, dtype)
    prompt_eval(args, baseline, finetuned, tokenizer, device, PROMPTS[args.language])


if __name__ == "__main__":
    run_main(main)
