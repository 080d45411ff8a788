"""Bad input the user can fix: one line, printed once, exit code 2 on every rank, no traceback.

    if __name__ == "__main__":
        run_main(main)

How ranks stay together. Under the launcher every rank runs the same checks on the same flags and
files, so every rank raises the same UserError at the same point and exits on its own; rank 0
alone prints it. The checks that run before `init_distributed` (flags, paths, tokenizers) involve
no collective at all. The one check that runs on a single rank (the dataset build on local rank 0)
shares its outcome with the other ranks where they would otherwise wait at a barrier
(`utils.data.data_utils.create_prompt_dataset`), so they raise the same error instead of hanging.
Should a rank still exit alone, the `deepspeed` launcher terminates the others (SIGTERM, which ends
a Python process without a traceback) and prints its own "exits with return code = 2" line.
"""
import os
import sys

EXIT_CODE = 2  # argparse's code for a bad command line


class UserError(Exception):
    """A bad input the user can fix. The message is one line naming the flag, file or row."""


def one_line(text):
    """`text` with its line breaks folded into " | " (a message must stay on one line)."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _rank():
    """Global rank: the process group's when there is one, else the launcher's RANK, else 0."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to print an error
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def report_error(message):
    """Print `error: <message>` once (global rank 0) on stderr."""
    sys.stdout.flush()
    if _rank() == 0:
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def exit_with_error(message):
    """Report `message` once and exit with EXIT_CODE on this rank (every rank calls it)."""
    report_error(message)
    sys.exit(EXIT_CODE)


def user_message(exc):
    """The one-line message of a known input error, or None for anything else (a bug: keep its
    traceback). Known: UserError, and huggingface_hub's repo-id check, which is what a local
    model path that does not exist turns into."""
    if isinstance(exc, UserError):
        return str(exc)
    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return None
    if isinstance(exc, HFValidationError):
        return (f"{exc} (a path that does not exist is read as a hub id; nothing is downloaded: "
                "pass a local model directory)")
    return None


def run_main(main, *args, **kwargs):
    """Run a script's entry point; a known input error ends it with one line and exit code 2 on
    every rank. Any other exception propagates unchanged (with its traceback)."""
    try:
        return main(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a known input error
        message = user_message(exc)
        if message is None:
            raise
        exit_with_error(message)
