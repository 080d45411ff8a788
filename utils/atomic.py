"""Files that are either whole or absent: every writer of the project that replaces a file (the
checkpoints' JSON, the metrics log, the evaluation answers, the exported weights, the data cache)
goes through here. A temp file next to the target is written, flushed and fsynced, then renamed
over it (`os.replace` is atomic on POSIX) and the directory fsynced; on an error the temp file is
removed and the target is untouched."""
import contextlib
import json
import os


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file and directory under `path` (bottom-up), then `path` itself."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def replaced_atomically(path, suffix=".tmp"):
    """Yields the temp path to write (`<path><suffix>`); when the block succeeds it is fsynced and
    renamed over `path`, and the directory fsynced. For writers that take a path (safetensors)."""
    tmp = path + suffix
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def open_atomic(path, mode="w", encoding="utf-8"):
    """`open(path, mode)` whose content replaces `path` only when the block succeeds."""
    with replaced_atomically(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def write_json_atomic(path, obj, **dump_kwargs):
    """`obj` as JSON (indent 1, sorted keys unless given otherwise), replacing `path` atomically."""
    with open_atomic(path) as f:
        json.dump(obj, f, **{"indent": 1, "sort_keys": True, **dump_kwargs})


def write_text_atomic(path, text):
    with open_atomic(path) as f:
        f.write(text)
