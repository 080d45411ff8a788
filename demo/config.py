"""The demo's settings in one visible block, and the stage flags they turn into."""
import dataclasses
import os
from dataclasses import dataclass


@dataclass
class DemoConfig:
    seed: int = 1                   # model init and every stage's --seed (the data is fixed)
    output_dir: str = "demo_output"
    # data: utils/data/synthetic.py, in the hub layout under <cache>/data/remax-demo/helpful-words
    data_seed: int = 0
    num_train: int = 8000
    num_test: int = 1000
    data_split: str = "3,3,4"       # SFT, reward model, ReMax prompts
    # the tiny OPT (utils/model/tiny_models.py); 768 BPE tokens make every demo word one token
    vocab_size: int = 768
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # stage 1: SFT on the chosen answers
    sft_epochs: int = 2
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    sft_ranks: int = 1              # 2 ranks were slower for a model this small (41 s vs 37 s)
    max_seq_len: int = 40
    # stage 2: reward model, initialised from the SFT model
    rm_epochs: int = 2
    rm_batch_size: int = 16
    rm_learning_rate: float = 1e-3
    rm_ranks: int = 1
    # stage 3: ReMax
    remax_epochs: int = 1
    remax_batch_size: int = 16      # prompts per rank and update
    # 3e-4 already turns greedy answers into helpful words only (KL 0.44) and 1e-3 passes
    # target_kl by step 48; 5e-5 still gains +70-90 % on the rule in 100 updates (docs/demo.md)
    remax_learning_rate: float = 5e-5
    kl_ctl: float = 0.05            # kl_ctl and gamma: the original's OPT recipe
    gamma: float = 0.99
    target_kl: float = 1.0          # stage 3's default
    max_prompt_seq_len: int = 24
    max_answer_seq_len: int = 16
    remax_ranks: int = 2            # as fast as 1 rank with twice the batch; shards the eval too
    remax_evals: int = 8            # evaluations over the run (plus the one before training)
    eval_batches: int = 8           # prompt batches per rank and evaluation

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def cache_dir(self):
        return os.path.join(self.output_dir, "cache")

    @property
    def model_dir(self):
        return os.path.join(self.cache_dir, f"tiny-opt-{self.hidden_size}x{self.num_layers}-"
                                            f"v{self.vocab_size}-seed{self.seed}")

    def run_dir(self, stage):
        return os.path.join(self.output_dir, f"seed{self.seed}", stage)


def _supervised_args(cfg, model_dir, data_dir, out, batch_size, learning_rate, epochs,
                     weight_decay):
    """Flags stages 1 and 2 share."""
    return ["--model_name_or_path", model_dir, "--data_path", data_dir,
            "--data_split", cfg.data_split, "--data_output_path", _data_cache(cfg),
            "--output_dir", out, "--max_seq_len", cfg.max_seq_len,
            "--per_device_train_batch_size", batch_size, "--per_device_eval_batch_size", 64,
            "--learning_rate", learning_rate, "--weight_decay", weight_decay,
            "--num_train_epochs", epochs, "--num_warmup_steps", 10,
            "--lr_scheduler_type", "cosine", "--zero_stage", 2, "--evals_per_epoch", 2,
            "--seed", cfg.seed, "--deepspeed"]


def sft_args(cfg, model_dir, data_dir):
    out = cfg.run_dir("step1_sft")
    return _supervised_args(cfg, model_dir, data_dir, out, cfg.sft_batch_size,
                            cfg.sft_learning_rate, cfg.sft_epochs, weight_decay=0.0), out


def reward_args(cfg, sft_dir, data_dir):
    """The reward model starts from the SFT model; OPT's BOS is the pad id (one pad in front)."""
    out = cfg.run_dir("step2_reward")
    args = _supervised_args(cfg, sft_dir, data_dir, out, cfg.rm_batch_size, cfg.rm_learning_rate,
                            cfg.rm_epochs, weight_decay=0.1)
    return args + ["--num_padding_at_beginning", 1, "--disable_dropout"], out


def remax_args(cfg, sft_dir, reward_dir, data_dir):
    out = cfg.run_dir("step3_remax")
    args = ["--actor_model_name_or_path", sft_dir, "--reward_model_name_or_path", reward_dir,
            "--data_path", data_dir, "--data_split", cfg.data_split,
            "--data_output_path", _data_cache(cfg), "--output_dir", out,
            "--max_prompt_seq_len", cfg.max_prompt_seq_len,
            "--max_answer_seq_len", cfg.max_answer_seq_len,
            "--per_device_generation_batch_size", cfg.remax_batch_size,
            "--per_device_training_batch_size", cfg.remax_batch_size,
            "--per_device_eval_batch_size", 64, "--num_train_epochs", cfg.remax_epochs,
            "--actor_learning_rate", cfg.remax_learning_rate, "--actor_weight_decay", 0.0,
            "--lr_scheduler_type", "constant", "--num_warmup_steps", 0,
            "--kl_ctl", cfg.kl_ctl, "--target_kl", cfg.target_kl, "--gamma", cfg.gamma,
            "--seed", cfg.seed, "--actor_zero_stage", 2, "--reference_zero_stage", 0,
            "--reward_zero_stage", 0, "--num_padding_at_beginning", 1,
            "--disable_actor_dropout", "--disable_reward_dropout",
            "--evals_per_epoch", cfg.remax_evals, "--eval_batches", cfg.eval_batches,
            "--ppl_eval_batches", 2, "--save_answers", "--save_at_final", "--deepspeed"]
    return args, out


def _data_cache(cfg):
    return os.path.join(cfg.cache_dir, "tokenized")


def quick_config(cfg):
    """The shortened demo of tests/test_demo.py: the same pipeline on fewer rows, epochs and
    ReMax steps (the direction of every change, not the full-size thresholds)."""
    return cfg.replace(num_train=3000, num_test=400, sft_epochs=2, rm_epochs=1, remax_evals=3,
                       eval_batches=4)
