"""What a stage-3 run knows about its own progress: the part of the loop a resume must restore."""
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class TrainState:
    epoch: int = 0
    global_step: int = 0            # actor updates done
    non_overflow_steps: int = 0     # updates DeepSpeed did not skip for fp16 overflow
    best_eval_reward: Optional[float] = None
    last_eval_kl: Optional[float] = None
    early_stopped: bool = False

    def is_best(self, eval_reward):
        """Record `eval_reward`; True when it ties or beats the best so far (ties save, as the
        original). The original's initial evaluation did not count; ours does not either."""
        if self.best_eval_reward is None or eval_reward >= self.best_eval_reward:
            self.best_eval_reward = eval_reward
            return True
        return False

    def count_update(self, skipped):
        """One more update; `skipped`: DeepSpeed skipped its step (fp16 overflow)."""
        self.global_step += 1
        if not skipped:
            self.non_overflow_steps += 1

    def to_dict(self):
        return asdict(self)
