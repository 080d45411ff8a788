"""Tiny OPT- and Llama-family checkpoints built offline, for tests and the CPU demo.

Nothing is downloaded: the tokenizer is trained here on text generated from a fixed word list
(a byte-level BPE for OPT, a SentencePiece model for Llama, as the real families use), and the
model has random weights with a config shaped like the real family's. The directory written is an
ordinary Hugging Face checkpoint: `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir)`
load it with no project code.

    python -m utils.model.tiny_models --family opt --output_dir /tmp/tiny-opt
"""
import argparse
import json
import os
import random
import shutil
import tempfile

FAMILIES = ("opt", "llama")

# Words the generated training text is made of. Anything else still encodes: the BPE is
# byte-level and the SentencePiece model has byte fallback.
_WORDS = """
the a an and or but so of to in on for with about from by at as is are was were be been it this
that these those you your we our they their he she his her i my me what why how when where who
which can could would should will do does did have has had not no yes please thank thanks tell
explain describe write give make help show find know think want need like good great best better
kind clear useful helpful honest careful safe polite friendly correct accurate simple short long
bad wrong rude unsafe boring vague random odd strange maybe perhaps sure okay fine well very
really quite just only also more most less many much some any every each other another same
time day year world people thing way place home work school book story poem song music art
science history math water food tree river city country moon sun star sky bird fish dog cat
frog telescope computer phone car train plane garden kitchen market doctor teacher student
friend family child parent question answer idea reason fact step list example summary plan
""".split()

_OPT_RESERVED_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, the same order as OPT's vocabulary


def generated_corpus(num_lines=3000, seed=0):
    """Deterministic "Human: ... Assistant: ..." lines over the word list."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        question = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        answer = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 20)))
        lines.append(f"\n\nHuman: {question.capitalize()}?\n\nAssistant: {answer.capitalize()}.")
    return lines


def _opt_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_OPT_RESERVED_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(generated_corpus(), trainer=trainer)
    eos_id = tok.token_to_id("</s>")
    # OPT prepends its BOS, which is "</s>" (the same id as eos and, in this pipeline, pad).
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def _llama_tokenizer(vocab_size, workdir):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(line.strip() for line in generated_corpus()))
    prefix = os.path.join(workdir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    # transformers 5.x: LlamaTokenizer(vocab_file=...) silently yields a 3-token vocabulary;
    # from_pretrained on a directory holding tokenizer.model loads the real model.
    return LlamaTokenizer.from_pretrained(workdir, add_bos_token=True, legacy=False)


def _round_up(n, multiple=8):
    return (n + multiple - 1) // multiple * multiple


def _model_config(family, vocab_size, hidden_size, num_layers, num_heads, max_positions):
    from transformers import LlamaConfig, OPTConfig

    if family == "opt":
        # OPT: bos = eos = "</s>" (2), pad "<pad>" (1), learned positions, pre-layer-norm.
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, ffn_dim=4 * hidden_size,
                         max_position_embeddings=max_positions, word_embed_proj_dim=hidden_size,
                         do_layer_norm_before=True, dropout=0.1, attention_dropout=0.0,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2, torch_dtype="float32")
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=_round_up(8 * hidden_size // 3), num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                       torch_dtype="float32")


def build_tiny_checkpoint(family, output_dir, vocab_size=512, hidden_size=64, num_layers=2,
                          num_heads=4, max_positions=512, seed=1234, overwrite=False):
    """Write a tiny `family` ("opt" or "llama") checkpoint into `output_dir`; return the path.

    An existing complete checkpoint is reused unless `overwrite`.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    marker = os.path.join(output_dir, "tiny_model.json")
    if os.path.exists(marker) and not overwrite:
        return output_dir
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        if family == "opt":
            tokenizer = _opt_tokenizer(vocab_size)
        else:
            tokenizer = _llama_tokenizer(vocab_size, staging)
        config = _model_config(family, _round_up(len(tokenizer)), hidden_size, num_layers,
                               num_heads, max_positions)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for scratch in ("corpus.txt", "tokenizer.vocab"):
            path = os.path.join(staging, scratch)
            if os.path.exists(path):
                os.remove(path)
        with open(os.path.join(staging, "tiny_model.json"), "w") as f:
            json.dump({"family": family, "vocab_size": vocab_size, "hidden_size": hidden_size,
                       "num_layers": num_layers, "num_heads": num_heads, "seed": seed}, f, indent=2)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    path = build_tiny_checkpoint(args.family, args.output_dir, args.vocab_size, args.hidden_size,
                                 args.num_layers, args.num_heads, seed=args.seed,
                                 overwrite=args.overwrite)
    print(f"tiny {args.family} checkpoint: {path}")


if __name__ == "__main__":
    main()
