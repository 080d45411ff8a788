"""Score answers with a trained reward model.

    python rw_eval.py --model_name_or_path ./log/step2_reward-facebook_opt-350m-... \
        --num_padding_at_beginning 1 [--data_path /data/Dahoas/rm-static]

Always: the original's pair comparison, two fixed prompts each with a good and a bad answer.
With --prompt and --answer: the score of that one answer (the original's unused run_single_sample).
With --data_path: accuracy and mean chosen / rejected scores on the phase-2 eval split of the data
(the split stage 2 evaluated on, given the same --data_split, --data_seed and --max_seq_len).

Runs as a plain `python` process: the original crashed without a process group; nothing here
needs one. The device comes from DeepSpeed's accelerator (the original: cuda:0).
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils import arguments  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.model.model_utils import (TOKENIZER_FILES, create_critic_model,  # noqa: E402
                                     load_hf_tokenizer)
from utils.model.reward_model import check_reward_model_dir  # noqa: E402

EVAL_RESULT_HEADER = "==================Eval result============================"
SCORES_HEADER = "=============Scores (higher, better)========================"
HELD_OUT_HEADER = "=============Held-out pairs (phase-2 eval split)============="

# (prompt, good answer, bad answer); the prompts are the original's, the answers our own.
PAIRS = [
    ("Human: Please tell me about Microsoft in a few sentence? Assistant: ",
     "Microsoft is an American technology company founded by Bill Gates and Paul Allen in 1975 and "
     "based in Redmond, Washington. It makes the Windows operating system and the Office suite, "
     "runs the Azure cloud platform and sells the Xbox game consoles. It is one of the largest "
     "software companies in the world.",
     "I don't know, maybe a company. A company. A company. A company."),
    ("Human: Explain the moon landing to a 6 year old in a few sentences. Assistant: ",
     "A long time ago, in 1969, brave astronauts flew a big rocket all the way to the moon. Two of "
     "them climbed down a ladder and walked on the dusty ground, and they brought rocks back home "
     "so scientists could study them.",
     "I don't know. The moon is the moon. I don't know."),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = arguments.new_parser("Score answers with a trained reward model")
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="A stage-2 output directory (ours, or the original's pytorch_model.bin).")
    parser.add_argument("--tokenizer_name_or_path", type=str, default=None,
                        help="Where the tokenizer is (default: --model_name_or_path; the original's "
                             "checkpoints hold no tokenizer files).")
    parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                        help="Pad-id tokens at the start of every sequence: 1 for OPT, 0 for Llama.")
    parser.add_argument("--prompt", type=str, default=None, help="Score one answer: its prompt.")
    parser.add_argument("--answer", type=str, default=None, help="Score one answer: the answer.")
    arguments.add_data_args(parser)
    parser.set_defaults(data_path=[])  # the held-out evaluation runs only when data is given
    parser.add_argument("--max_seq_len", type=int, default=512,
                        help="Sequences are padded/truncated to this length.")
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs per held-out batch.")
    parser.add_argument("--max_batches", type=int, default=100,
                        help="Held-out batches scored at most (stage 2's 100; <= 0: all).")
    parser.add_argument("--dtype", type=str, default="fp32", choices=sorted(DTYPES),
                        help="Precision the reward model is run in.")
    args = parser.parse_args(argv)
    if (args.prompt is None) != (args.answer is None):
        parser.error("--prompt and --answer go together")
    try:
        arguments.parse_data_split(args.data_split)
    except UserError as err:
        parser.error(str(err))
    return args


def check_inputs(args):
    """The reward-model directory, where its tokenizer is, and the held-out data (files only)."""
    check_reward_model_dir(args.model_name_or_path, "--model_name_or_path")
    tokenizer_flag = "--tokenizer_name_or_path" if args.tokenizer_name_or_path else "--model_name_or_path"
    tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
    if not os.path.isdir(tokenizer_path) or not any(
            os.path.exists(os.path.join(tokenizer_path, name)) for name in TOKENIZER_FILES):
        hint = "" if args.tokenizer_name_or_path else \
            " (the original's checkpoints hold none: pass --tokenizer_name_or_path)"
        raise UserError(f"{tokenizer_flag} {tokenizer_path}: no tokenizer files "
                        f"({', '.join(TOKENIZER_FILES)}){hint}")
    arguments.check_inputs(args)


def get_device():
    from deepspeed import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def load_stuff(model_name_or_path, num_padding_at_beginning, tokenizer_name_or_path=None):
    """(reward model in eval mode, tokenizer); the tokenizer has pad == eos (load_hf_tokenizer)."""
    tokenizer = load_hf_tokenizer(tokenizer_name_or_path or model_name_or_path)
    model = create_critic_model(model_name_or_path, tokenizer, None, num_padding_at_beginning,
                                rlhf_training=True)
    return model.eval(), tokenizer


def encode(tokenizer, texts, max_seq_len, device):
    """`text + eos` for each text, right-padded to max_seq_len: input_ids/attention_mask [N, max_seq_len]."""
    batch = tokenizer([text + tokenizer.eos_token for text in texts], max_length=max_seq_len,
                      padding="max_length", truncation=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


@torch.no_grad()
def score_pair(model, tokenizer, prompt, good_ans, bad_ans, max_seq_len, device):
    """(good score, bad score): end-token scores of the pairwise forward on [2, max_seq_len]."""
    batch = encode(tokenizer, [prompt + good_ans, prompt + bad_ans], max_seq_len, device)
    outputs = model(**batch)
    return outputs["chosen_mean_scores"].item(), outputs["rejected_mean_scores"].item()


@torch.no_grad()
def score_single(model, tokenizer, prompt, answer, num_padding_at_beginning, max_seq_len, device):
    """Score of one answer through forward_value, read at the first eos from position
    max(2, num_padding_at_beginning) on, as the original's run_single_sample."""
    batch = encode(tokenizer, [prompt + answer], max_seq_len, device)
    outputs = model.forward_value(**batch, prompt_length=max(2, num_padding_at_beginning))
    return outputs["chosen_end_scores"].item()


def run_pair_comparison(model, tokenizer, max_seq_len, device):
    for prompt, good_ans, bad_ans in PAIRS:
        good_score, bad_score = score_pair(model, tokenizer, prompt, good_ans, bad_ans, max_seq_len,
                                           device)
        print(EVAL_RESULT_HEADER)
        print(f"prompt: {prompt}")
        print(f"good_ans: {good_ans}")
        print(f"bad_ans: {bad_ans}")
        print()
        print(SCORES_HEADER)
        print(f"good_ans score: {good_score}")
        print(f"bad_ans score: {bad_score}")
        print(flush=True)


def run_single_sample(model, tokenizer, prompt, answer, num_padding_at_beginning, max_seq_len, device):
    score = score_single(model, tokenizer, prompt, answer, num_padding_at_beginning, max_seq_len, device)
    print(EVAL_RESULT_HEADER)
    print(f"prompt: {prompt}")
    print(f"my_ans: {answer}")
    print()
    print(SCORES_HEADER)
    print(f"my_ans score: {score}")
    print(flush=True)


def evaluate_held_out(model, tokenizer, args, device):
    """Accuracy and mean scores on the phase-2 eval split of --data_path (stage 2's evaluation)."""
    from utils.data.data_utils import DataCollatorReward, create_prompt_dataset
    from utils.training import evaluate_reward, make_loader

    _, eval_data = create_prompt_dataset(
        -1, args.data_path, args.data_split, args.data_output_path, 2, args.data_seed, tokenizer,
        args.max_seq_len, end_of_conversation_token=tokenizer.eos_token,
        strict_data=args.strict_data, required=("eval",))
    loader = make_loader(eval_data, args.batch_size, DataCollatorReward(), shuffle=False,
                         distributed=False)
    max_batches = args.max_batches if args.max_batches > 0 else None
    scores = evaluate_reward(model, loader, device, max_batches)
    pairs = min(len(eval_data), args.batch_size * max_batches) if max_batches else len(eval_data)
    print(HELD_OUT_HEADER)
    print(f"pairs: {pairs}")
    print(f"acc: {scores['acc']}")
    print(f"chosen mean score: {scores['chosen_score']}")
    print(f"rejected mean score: {scores['rejected_score']}")
    print(flush=True)
    return scores


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    device = get_device()
    model, tokenizer = load_stuff(args.model_name_or_path, args.num_padding_at_beginning,
                                  args.tokenizer_name_or_path)
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    run_pair_comparison(model, tokenizer, args.max_seq_len, device)
    if args.prompt is not None:
        run_single_sample(model, tokenizer, args.prompt, args.answer, args.num_padding_at_beginning,
                          args.max_seq_len, device)
    if args.data_path:
        evaluate_held_out(model, tokenizer, args, device)


if __name__ == "__main__":
    run_main(main)
