"""Non-finite losses: the update is skipped on every rank together, counted, logged; too many in
a row stop the run (after a checkpoint) with one line.

Each rank's loss is checked before its backward and the verdict is all-reduced, so every rank
knows when any rank's loss is NaN/inf. Then every rank backwards a NaN loss: the gradients of the
whole accumulation window become NaN, and DeepSpeed's ZeRO 1-3 optimizers (fp32, fp16, and bf16
with its default `check_grad_overflow`; ZeRO 0 with fp16 or bf16) see a non-finite global gradient
norm, drop the gradients and skip the optimizer step, identically on every rank. ZeRO stage 0 in
fp32 keeps the plain torch optimizer, which checks nothing; there the guard makes that one step a
no-op that the engine sees as an overflow (gradients dropped, LR schedule held, step counted as
skipped). A poisoned window whose step DeepSpeed reports as applied is an error, never
a silent NaN in the weights.

The original and DeepSpeed-Chat decided per rank: one rank raised and the others waited in the
next collective until the timeout.

    guard = NonFiniteUpdates(args.max_nonfinite_updates, streak=state.nonfinite_streak)
    guard.begin_update(step)                  # the update's number (for logs and --debug_nan_loss)
    guard.backward_and_step(engine, loss)     # instead of engine.backward(loss); engine.step()
    outcome = guard.end_update()              # "applied" / "skipped" / "overflow" / "stop"
"""
import argparse
import math
from contextlib import contextmanager
from dataclasses import dataclass

from utils.errors import UserError
from utils.utils import all_reduce_sum, get_rank, print_rank_0

APPLIED, SKIPPED, OVERFLOW, STOP = "applied", "skipped", "overflow", "stop"


def add_nonfinite_args(group):
    group.add_argument("--max_nonfinite_updates", type=int, default=3,
                       help="Stop (after saving a checkpoint) when this many updates in a row had "
                            "a non-finite loss on some rank; each one is skipped on every rank.")
    # Tests: "UPDATE@RANK,..." makes that rank's loss NaN in that update (the number the loop logs:
    # stages 1-2 the optimizer step the update makes, from 1; stage 3 the update index, from 0).
    group.add_argument("--debug_nan_loss", type=str, default="", help=argparse.SUPPRESS)
    return group


def parse_debug_nan_loss(value):
    """ "3@1,4@0" -> {(3, 1), (4, 0)}; a bare "3" means rank 0."""
    points = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        update, _, rank = item.partition("@")
        try:
            points.add((int(update), int(rank or 0)))
        except ValueError:
            raise UserError(f"--debug_nan_loss {value!r}: expected UPDATE@RANK,...") from None
    return points


class NonFiniteStop(UserError):
    """Too many non-finite updates in a row (raised on every rank, after the checkpoint)."""


@dataclass
class _Window:
    name: str
    poisoned: bool = False
    bad_ranks: int = 0


class NonFiniteUpdates:
    def __init__(self, patience=3, streak=0, skipped=0, overflows=0, debug_nan_loss=""):
        self.patience = patience
        self.streak = streak            # updates in a row with a non-finite loss
        self.skipped = skipped          # updates skipped for a non-finite loss, whole run
        self.overflows = overflows      # optimizer steps DeepSpeed skipped for fp16 overflow
        self.inject = parse_debug_nan_loss(debug_nan_loss)
        self.update = 0
        self.rank = get_rank()
        self._windows = {}              # id(engine) -> _Window of its current accumulation window
        self._outcome = set()
        self._poisoned = False          # this rank's current update is unusable (see poison)

    def begin_update(self, update):
        self.update, self._outcome, self._poisoned = update, set(), False

    def poison(self, reason):
        """This rank's part of the current update is unusable (e.g. non-finite logits while
        decoding): its every loss counts as non-finite, so the update is skipped on every rank
        like one with a NaN loss. Prints `reason` with the rank (other ranks may be healthy)."""
        print(f"[warning] update {self.update}, rank {self.rank}: {reason}; the update is "
              "skipped on every rank", flush=True)
        self._poisoned = True

    def agree(self, loss):
        """The loss to backward: this one, or NaN on every rank when any rank's is non-finite
        (or poisoned). Returns (loss, number of ranks whose loss was non-finite)."""
        if (self.update, self.rank) in self.inject or self._poisoned:
            loss = loss * float("nan")
        bad_ranks = int(all_reduce_sum([0.0 if math.isfinite(loss.item()) else 1.0])[0])
        return (loss * float("nan") if bad_ranks else loss), bad_ranks

    def backward_and_step(self, engine, loss, name="model"):
        """`engine.backward(loss); engine.step()`, skipping the optimizer step of an accumulation
        window in which any rank's loss was non-finite. `name` (actor, critic) is for the log.
        Returns the loss value (NaN when bad)."""
        loss, bad_ranks = self.agree(loss)
        window = self._windows.setdefault(id(engine), _Window(name))
        if bad_ranks:
            window.poisoned, window.bad_ranks = True, max(window.bad_ranks, bad_ranks)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        if boundary and window.poisoned and not _checks_gradients(engine):
            with _skipped_plain_step(engine.optimizer):
                engine.step()
        else:
            engine.step()
        if boundary:
            self._finish_window(engine, window)
            del self._windows[id(engine)]
        return loss.item()

    def _finish_window(self, engine, window):
        applied = engine.was_step_applied()
        if window.poisoned:
            if applied:
                raise RuntimeError(f"update {self.update}: DeepSpeed applied an optimizer step whose "
                                   "gradients are non-finite (this configuration does not check them)")
            print_rank_0(f"[warning] update {self.update}: non-finite {window.name} loss on "
                         f"{window.bad_ranks} rank(s); its optimizer step is skipped on every rank")
            self._outcome.add(SKIPPED)
        elif not applied:
            self._outcome.add(OVERFLOW)   # DeepSpeed printed its own line with the new loss scale
        else:
            self._outcome.add(APPLIED)

    def end_update(self):
        """After the update's last step, on every rank alike: APPLIED, SKIPPED (a step of it, the
        actor's or the critic's, was skipped for a non-finite loss), OVERFLOW (fp16) or STOP
        (`patience` skipped in a row)."""
        if SKIPPED in self._outcome:
            self.skipped += 1
            self.streak += 1
            return STOP if self.streak >= self.patience else SKIPPED
        self.streak = 0
        if OVERFLOW in self._outcome:
            self.overflows += 1
            return OVERFLOW
        return APPLIED

    def stop_error(self, checkpoint_note):
        return NonFiniteStop(f"the loss was non-finite for {self.streak} updates in a row (the last "
                             f"at update {self.update}), each skipped on every rank; "
                             f"{checkpoint_note}; lower the learning rate, or use --bf16 instead "
                             "of fp16, and continue with --resume")

    def counters(self, stopping=False):
        """The counts a checkpoint keeps; `stopping`: for the checkpoint of a STOP, whose resume
        starts a new streak (the user changed something)."""
        return {"nonfinite_streak": 0 if stopping else self.streak, "nonfinite_skipped": self.skipped,
                "overflow_skipped": self.overflows}


def settle_update(guard, step, metrics, prefix, record, checkpoint):
    """After an update, on every rank alike: log the skip counters (`<prefix>/nonfinite_skipped`,
    `<prefix>/overflow_skipped`) when a step was skipped, hand the outcome and the counters to
    `record(applied, counters)` (the training state's), and after `patience` non-finite updates in
    a row save through `checkpoint()` (returns the checkpoint's path), close the metrics and raise
    the one-line stop. Returns the outcome otherwise."""
    outcome = guard.end_update()
    if outcome != APPLIED:
        metrics.log(step, **{f"{prefix}/nonfinite_skipped": guard.skipped,
                             f"{prefix}/overflow_skipped": guard.overflows})
    record(outcome == APPLIED, guard.counters(stopping=outcome == STOP))
    if outcome == STOP:
        path = checkpoint()
        metrics.close()
        raise guard.stop_error(f"checkpoint {path}")
    return outcome


_MISSING = object()


@contextmanager
def _skipped_plain_step(optimizer):
    """Make a plain torch optimizer skip the next step the way DeepSpeed's own ones do: no update,
    and `.overflow` set, so the engine drops the gradients, leaves the LR schedule where it is and
    counts the step as skipped (`was_step_applied()` is False)."""
    saved = optimizer.__dict__.get("step", _MISSING)   # an LR scheduler may have wrapped it
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        if saved is _MISSING:
            del optimizer.step
        else:
            optimizer.step = saved
        del optimizer.overflow


def _checks_gradients(engine):
    """True when DeepSpeed wrapped the optimizer in one of its own (ZeRO 1-3, fp16, bf16), which
    skips a step whose gradient norm is non-finite and says so in `.overflow`; False for a plain
    torch optimizer (ZeRO stage 0 in fp32)."""
    return hasattr(engine.optimizer, "overflow")
