"""What a stage-3 run knows about its own progress: the part of the loop a resume must restore."""
from dataclasses import asdict, dataclass
from typing import Optional

from utils.utils import print_rank_0


@dataclass
class TrainState:
    epoch: int = 0
    global_step: int = 0            # actor updates done
    non_overflow_steps: int = 0     # updates DeepSpeed did not skip for fp16 overflow
    best_eval_reward: Optional[float] = None
    last_eval_kl: Optional[float] = None
    early_stopped: bool = False
    batches_in_epoch: int = 0       # prompt batches of `epoch` already turned into updates
    samples_per_batch: int = 0      # prompts per loader step over all ranks (a resume's unit)
    data_seed: int = 0
    nonfinite_streak: int = 0       # updates in a row skipped for a non-finite loss
    nonfinite_skipped: int = 0      # updates skipped for a non-finite loss, whole run
    overflow_skipped: int = 0       # updates with an actor/critic step DeepSpeed skipped (fp16)
    last_eval: Optional[dict] = None  # {"step": s, "eval/reward": r, ...}: ranks checkpoints
    metrics_lines: int = 0          # records in metrics.jsonl when this state was taken

    @classmethod
    def new(cls, args, world_size, resume=None):
        """A fresh run's state, or the checkpoint's with its data position carried over: the
        prompt batches of the epoch already used, rounded down to this run's loader steps when
        the number of ranks changed (a warning says how many prompts are then used again)."""
        samples = args.per_device_generation_batch_size * world_size
        if resume is None:
            return cls(samples_per_batch=samples, data_seed=args.data_seed)
        state = cls(**resume.loop_state)
        if state.samples_per_batch != samples:
            used = state.batches_in_epoch * state.samples_per_batch
            state.batches_in_epoch = used // samples
            repeated = used - state.batches_in_epoch * samples
            if repeated:
                print_rank_0(f"[resume] {used} prompts of epoch {state.epoch + 1} were used with "
                             f"{state.samples_per_batch} per loader step; with {samples} now, "
                             f"{repeated} of them are used again")
            state.samples_per_batch = samples
        return state

    def is_best(self, eval_reward):
        """Record `eval_reward`; True when it ties or beats the best so far (ties save, as the
        original). The original's initial evaluation did not count; ours does not either."""
        if self.best_eval_reward is None or eval_reward >= self.best_eval_reward:
            self.best_eval_reward = eval_reward
            return True
        return False

    def count_update(self, applied, nonfinite_streak, nonfinite_skipped, overflow_skipped):
        """One more update; `applied`: no optimizer step of it was skipped (fp16 overflow or a
        non-finite loss); the rest are NonFiniteUpdates' counters."""
        self.global_step += 1
        self.non_overflow_steps += int(applied)
        self.nonfinite_streak, self.nonfinite_skipped, self.overflow_skipped = (
            nonfinite_streak, nonfinite_skipped, overflow_skipped)

    def to_dict(self):
        return asdict(self)
