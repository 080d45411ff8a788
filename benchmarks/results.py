"""benchmarks/RESULTS.md: one marked section per benchmark, replaced by its full runs."""
import os

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def markers(name):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text, name, body):
    """`text` with the part between the `name` markers replaced by `body` (appended, with its
    markers, when the markers are missing)."""
    start, end = markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def update_results(name, body, path=RESULTS_PATH):
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    with open(path, "w") as f:
        f.write(replace_section(text, name, body))
    return path


def footer_lines(module, argv, failures, wall_seconds):
    """The closing lines of a benchmark's section: its failures and the command that made it."""
    lines = [f"- FAILED {name}: {message}" for name, message in failures.items()]
    command = " ".join(["python -m", module, *argv])
    lines.append(f"- Command: `{command}` ({wall_seconds / 60:.1f} min in all).")
    return lines
