"""Check the GPU install (environment.yml + constraints.txt + requirements.txt) against PyPI's metadata.

    python scripts/check_gpu_install.py                   # resolve with pip, then one verdict line per check
    python scripts/check_gpu_install.py --report r.json   # check a saved pip report instead (offline)
    python scripts/check_gpu_install.py --env-file other.yml --save-report r.json
    python scripts/check_gpu_install.py --extra-index-url https://download.pytorch.org/whl/cu126 --nvcc 12.6 --gcc 13

The pip part of environment.yml (`-c constraints.txt -r requirements.txt`) is resolved with
`pip install --dry-run --ignore-installed --report`: pip reads each package's metadata (PEP 658 files
where the index advertises them, else HTTP range requests into the wheel: `fast-deps`) and builds the
metadata of deepspeed's sdist; it downloads whole only that 2 MB sdist and the setuptools wheel (under
1 MB) of its build environment: about 45 MB in all, most of it index pages, and about 20 s. The checks
read its report:

- torch-version: the torch pip resolves is the version constraints.txt pins (the CPU suite's);
- nvcc: the CUDA major.minor of torch's CUDA dependency (`cuda-toolkit==13.0.3` in its
  `requires_dist`) is the one environment.yml's `cuda-nvcc` ships: DeepSpeed refuses to build an op
  when the majors differ, and for CUDA 13 also when the minors differ (`CUDAMismatchException`);
- torch-requirements: every resolved package's own torch requirement (its base one and that of its
  `torch` extra, e.g. transformers' `torch>=2.6`) admits the pinned torch;
- host-compiler: environment.yml's gcc is one that this nvcc accepts;
- platform: the resolution ran for the GPU environment's platform (Linux x86_64, its Python);
- metadata-only (when it resolved, not on a saved report): pip downloaded no large file whole.

Exit status 0 when every check passes, 1 when one fails, 2 when the resolution itself failed.
The functions below are pure (text and report dicts in, verdicts out) except `resolve` and `main`.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPI = "https://pypi.org/simple"

# The newest gcc major each nvcc accepts: the `#if __GNUC__ > N` guard of its include/crt/host_config.h
# (read from NVIDIA's nvidia-cuda-nvcc-cu12 / nvidia-cuda-crt wheels of that version). NVIDIA's
# installation guide lists the same upper ends; older gcc than 9 cannot build torch's C++17 extensions.
NVCC_MAX_GCC = {(12, 4): 13, (12, 6): 13, (12, 8): 14, (12, 9): 14, (13, 0): 15}
MIN_GCC = 9

# DeepSpeed 0.19.8's op builder (deepspeed/ops/op_builder/builder.py, `cuda_minor_mismatch_ok`): nvcc and
# torch's CUDA may differ in the minor only when both are in this list of the same major; otherwise any
# difference in major.minor raises CUDAMismatchException (unless DS_SKIP_CUDA_CHECK=1).
DEEPSPEED_MINOR_MISMATCH_OK = {
    11: {"11.0", "11.1", "11.2", "11.3", "11.4", "11.5", "11.6", "11.7", "11.8"},
    12: {"12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.8", "12.9"},
}

# Extras whose torch requirement counts: the base requirements and each package's `torch` extra (the
# project runs transformers, safetensors, huggingface_hub with torch); never dev/testing/benchmarks.
TORCH_EXTRAS = ("", "torch")


@dataclass
class CheckResult:
    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.message}"


@dataclass
class EnvSpec:
    """What an environment.yml asks for: conda match specs and the lines of its pip section."""
    conda: List[str]
    pip: List[str]


# --- reading the project's files -----------------------------------------------------------------

def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).rstrip()


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_environment_yml(text: str) -> EnvSpec:
    """The `dependencies:` list of a conda environment file: the conda specs and the `pip:` lines.

    A small reader for the layout conda env files use (block lists, one `pip:` sub-list), so that the
    check needs nothing beyond the standard library."""
    conda, pip = [], []
    section, pip_indent, dep_indent = None, None, None
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if indent == 0:
            section = stripped.rstrip(":").strip() if stripped.endswith(":") else None
            pip_indent = dep_indent = None
            continue
        if section != "dependencies" or not stripped.startswith("-"):
            continue
        item = stripped[1:].strip()
        if dep_indent is None:
            dep_indent = indent
        if pip_indent is not None and indent > dep_indent:
            pip.append(_unquote(item))
            continue
        pip_indent = None
        if item.rstrip(":").strip() == "pip" and item.endswith(":"):
            pip_indent = indent
            continue
        conda.append(_unquote(item))
    return EnvSpec(conda=conda, pip=pip)


def conda_spec_version(specs: Iterable[str], name: str) -> Optional[str]:
    """The version part of the first conda match spec for `name` (`cuda-nvcc=13.0`, `nvidia::cuda-nvcc
    13.0.*`, `cuda-nvcc>=13.0,<13.1`, `cuda-nvcc==13.0.88=h1234`): its first version number, or None
    when the package is absent or unversioned."""
    for spec in specs:
        spec = spec.strip()
        first = spec.split()[0] if spec.split() else ""
        body = spec.split("::", 1)[1] if "::" in first else spec
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)$", body)
        if not match or match.group(1).lower() != name.lower():
            continue
        version = re.search(r"\d+(?:\.\d+)*", match.group(2))
        return version.group(0) if version else None
    return None


def major_minor(version: Optional[str]) -> Optional[Tuple[int, Optional[int]]]:
    if not version:
        return None
    parts = version.split(".")
    return int(parts[0]), (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None)


def nvcc_version(env: EnvSpec) -> Tuple[Optional[Tuple[int, Optional[int]]], str]:
    """The CUDA (major, minor) of the nvcc an environment ships, and where it was read."""
    for name in ("cuda-nvcc", "cuda-version", "cuda-toolkit"):
        version = major_minor(conda_spec_version(env.conda, name))
        if version:
            return version, f"{name} {'.'.join(str(v) for v in version if v is not None)}"
    return None, "no cuda-nvcc (nor cuda-version / cuda-toolkit) with a version"


def gcc_version(env: EnvSpec) -> Tuple[Optional[int], str]:
    for name in ("gxx_linux-64", "gcc_linux-64", "gxx", "gcc"):
        version = major_minor(conda_spec_version(env.conda, name))
        if version:
            return version[0], f"{name} {version[0]}"
    return None, "no gcc_linux-64 / gxx_linux-64 with a version"


def read_pin(constraints_text: str, name: str = "torch") -> str:
    """The version a constraints file pins `name` to (`torch==2.13.0`); ValueError when it has none."""
    for raw in constraints_text.splitlines():
        line = _strip_comment(raw).strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != canonicalize_name(name):
            continue
        pinned = [s.version for s in req.specifier if s.operator in ("==", "===") and "*" not in s.version]
        if pinned:
            return pinned[0]
    raise ValueError(f"no {name}==VERSION line")


def pip_file_args(pip_lines: Sequence[str], base_dir: str) -> List[str]:
    """environment.yml's pip lines as pip arguments, with the -r/-c files made absolute (conda runs pip in
    the environment file's folder)."""
    args: List[str] = []
    for line in pip_lines:
        tokens = shlex.split(line)
        if not tokens:
            continue
        if tokens[0] in ("-r", "-c", "--requirement", "--constraint") and len(tokens) == 2:
            args += [tokens[0], os.path.normpath(os.path.join(base_dir, tokens[1]))]
        elif tokens[0].startswith("-"):
            args += tokens
        else:
            args.append(line)  # a requirement with spaces or markers stays one argument
    return args


def constraint_files(pip_lines: Sequence[str], base_dir: str) -> List[str]:
    args = pip_file_args(pip_lines, base_dir)
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--constraint")]


# --- reading pip's report ------------------------------------------------------------------------

def report_packages(report: dict) -> Dict[str, dict]:
    """Each resolved distribution's report entry, by canonical name."""
    return {canonicalize_name(item["metadata"]["name"]): item for item in report.get("install", [])}


def _marker_holds(req: Requirement, environment: dict, extra: str) -> bool:
    if req.marker is None:
        return extra == ""
    return req.marker.evaluate({**environment, "extra": extra})


def applicable_requirements(item: dict, environment: dict, extras: Iterable[str] = ("",)) -> List[Requirement]:
    """The requirements of one report entry that apply in `environment` with any of `extras` ("" is the
    base set) or one the resolution requested for it."""
    wanted = set(extras) | set(item.get("requested_extras") or [])
    out = []
    for line in item["metadata"].get("requires_dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if any(_marker_holds(req, environment, extra) for extra in wanted):
            out.append(req)
    return out


def torch_cuda_version(report: dict) -> Tuple[Optional[Tuple[int, Optional[int]]], str]:
    """The CUDA (major, minor) the resolved torch is built for, from its own requires_dist: the pinned
    `cuda-toolkit` (PyPI's wheels), else `nvidia-cuda-runtime[-cuNN]` (PyTorch's index), else the
    `-cuNN` suffix of its nvidia-* packages (major only). None for a CPU build."""
    torch = report_packages(report).get("torch")
    if torch is None:
        return None, "torch is not in the resolution"
    reqs = applicable_requirements(torch, report.get("environment", {}))
    for wanted in ("cuda-toolkit", "nvidia-cuda-runtime"):
        for req in reqs:
            name = canonicalize_name(req.name)
            if name == wanted or (wanted == "nvidia-cuda-runtime" and re.fullmatch(r"nvidia-cuda-runtime-cu\d+", name)):
                pins = [s.version for s in req.specifier if s.operator in ("==", "===", "~=", ">=")]
                version = major_minor(pins[0].rstrip(".*")) if pins else None
                if version:
                    return version, f"{req.name}{req.specifier}"
    for req in reqs:
        match = re.fullmatch(r"nvidia-.*-cu(\d+)", canonicalize_name(req.name))
        if match:
            return (int(match.group(1)), None), f"{req.name}{req.specifier}"
    return None, f"torch {torch['metadata']['version']} names no CUDA package (a CPU build)"


def _fmt(version: Tuple[int, Optional[int]]) -> str:
    return ".".join(str(v) for v in version if v is not None)


# --- the checks ----------------------------------------------------------------------------------

def check_torch_version(report: dict, pin: str) -> CheckResult:
    torch = report_packages(report).get("torch")
    if torch is None:
        return CheckResult("torch-version", False, "torch is not in the resolution")
    resolved = torch["metadata"]["version"]
    url = (torch.get("download_info") or {}).get("url", "")
    where = f" ({url.rsplit('/', 1)[-1]})" if url else ""
    if SpecifierSet(f"=={pin}").contains(resolved, prereleases=True):
        return CheckResult("torch-version", True, f"torch {resolved} resolved{where}, the version constraints.txt pins")
    return CheckResult("torch-version", False,
                       f"torch {resolved} resolved{where}, but constraints.txt pins {pin} (the version the suite tests)")


def check_nvcc(report: dict, env: EnvSpec) -> CheckResult:
    torch_cuda, source = torch_cuda_version(report)
    nvcc, nvcc_source = nvcc_version(env)
    if torch_cuda is None:
        return CheckResult("nvcc", False, f"{source}: no CUDA version to match nvcc against")
    if nvcc is None:
        return CheckResult("nvcc", False, f"environment.yml ships {nvcc_source}; torch needs CUDA {_fmt(torch_cuda)}")
    head = f"torch's CUDA {_fmt(torch_cuda)} ({source}), environment.yml's nvcc {_fmt(nvcc)} ({nvcc_source})"
    if nvcc[0] != torch_cuda[0]:
        return CheckResult("nvcc", False, f"{head}: different CUDA majors, DeepSpeed stops every op build with "
                                          "CUDAMismatchException")
    if torch_cuda[1] is None or nvcc[1] is None or nvcc[1] == torch_cuda[1]:
        return CheckResult("nvcc", True, head)
    ok_list = DEEPSPEED_MINOR_MISMATCH_OK.get(nvcc[0], set())
    if _fmt(nvcc) in ok_list and _fmt(torch_cuda) in ok_list:
        return CheckResult("nvcc", True, f"{head}: minors differ, which DeepSpeed 0.19.8 accepts for CUDA {nvcc[0]}")
    return CheckResult("nvcc", False, f"{head}: DeepSpeed 0.19.8 accepts no other minor for CUDA {nvcc[0]} "
                                      "(CUDAMismatchException)")


def check_torch_requirements(report: dict, pin: str) -> CheckResult:
    environment = report.get("environment", {})
    seen, bad = [], []
    for name, item in sorted(report_packages(report).items()):
        if name == "torch":
            continue
        for req in applicable_requirements(item, environment, TORCH_EXTRAS):
            if canonicalize_name(req.name) != "torch" or not str(req.specifier):
                continue
            label = f"{item['metadata']['name']} {item['metadata']['version']} needs torch{req.specifier}"
            if label in seen or label in bad:
                continue
            (seen if req.specifier.contains(pin, prereleases=True) else bad).append(label)
    if bad:
        return CheckResult("torch-requirements", False, f"the pinned torch {pin} does not meet: " + "; ".join(bad))
    if not seen:
        return CheckResult("torch-requirements", True, "no resolved package states a torch version")
    return CheckResult("torch-requirements", True, f"torch {pin} meets " + "; ".join(seen))


def check_host_compiler(env: EnvSpec) -> CheckResult:
    nvcc, nvcc_source = nvcc_version(env)
    gcc, gcc_source = gcc_version(env)
    if gcc is None:
        return CheckResult("host-compiler", False, f"environment.yml has {gcc_source}")
    if nvcc is None or nvcc[1] is None or tuple(nvcc) not in NVCC_MAX_GCC:
        return CheckResult("host-compiler", False,
                           f"{gcc_source}: no known gcc range for {nvcc_source} (known: "
                           + ", ".join(f"nvcc {a}.{b} gcc <= {g}" for (a, b), g in sorted(NVCC_MAX_GCC.items())) + ")")
    highest = NVCC_MAX_GCC[tuple(nvcc)]
    if MIN_GCC <= gcc <= highest:
        return CheckResult("host-compiler", True, f"{gcc_source}, which nvcc {_fmt(nvcc)} accepts (gcc {MIN_GCC} to {highest})")
    return CheckResult("host-compiler", False, f"{gcc_source}, outside what nvcc {_fmt(nvcc)} and torch's C++17 "
                                               f"accept (gcc {MIN_GCC} to {highest})")


def check_platform(report: dict, env: EnvSpec) -> CheckResult:
    environment = report.get("environment", {})
    platform = f"{environment.get('sys_platform')} {environment.get('platform_machine')}"
    python = environment.get("python_version")
    wanted = conda_spec_version(env.conda, "python")
    wanted = ".".join(wanted.split(".")[:2]) if wanted else None
    problems = []
    if platform != "linux x86_64":
        problems.append(f"resolved for {platform}, the GPU nodes are linux x86_64")
    if wanted and python != wanted:
        problems.append(f"resolved for Python {python}, environment.yml has python={wanted}")
    if problems:
        return CheckResult("platform", False, "; ".join(problems) + " (run the check there)")
    return CheckResult("platform", True, f"resolved for {platform}, Python {python}")


_UNITS = {"B": 1, "bytes": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def whole_downloads(pip_log: str) -> List[Tuple[str, float]]:
    """The files pip downloaded whole (its `Downloading NAME (SIZE)` lines), sizes in bytes. Metadata read
    from PEP 658 files or with range requests (`Obtaining dependency information from ...`) is not listed."""
    out = []
    for match in re.finditer(r"Downloading (\S+) \(([\d.]+) ?([A-Za-z]+)\)", pip_log):
        out.append((match.group(1).rsplit("/", 1)[-1], float(match.group(2)) * _UNITS.get(match.group(3), 1)))
    return out


def check_downloads(pip_log: str, limit_bytes: float = 50e6) -> CheckResult:
    files = whole_downloads(pip_log)
    listed = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in files) or "nothing"
    big = [name for name, size in files if size >= limit_bytes]
    if big:
        return CheckResult("metadata-only", False, f"pip downloaded whole wheels: {listed} (the index serves no PEP "
                                                   "658 metadata and fast-deps did not apply?)")
    return CheckResult("metadata-only", True, f"downloaded whole: {listed}; every other package's metadata came "
                                              "without its file")


def run_checks(report: dict, pin: str, env: EnvSpec) -> List[CheckResult]:
    return [check_platform(report, env), check_torch_version(report, pin), check_nvcc(report, env),
            check_torch_requirements(report, pin), check_host_compiler(env)]


# --- resolving -----------------------------------------------------------------------------------

class ResolveError(RuntimeError):
    pass


def pip_command(pip_args: Sequence[str], report_path: str, index_url: str = PYPI,
                extra_index_urls: Sequence[str] = (), python: str = sys.executable) -> List[str]:
    """The dry run. Why each option:
    --isolated + PIP_CONFIG_FILE=os.devnull (see pip_environment): no pip.conf (not the global one
        either, which --isolated alone still reads) and no PIP_* variable, so no local find-links
        folder or extra index with a torch CPU wheel (this machine has both) and no machine-wide
        constraint file enter the resolution: it sees what a GPU node sees;
    --index-url PyPI: where environment.yml's pip takes torch from;
    --ignore-installed: resolve everything, not only what the running environment lacks;
    --use-feature=fast-deps: where an index does not advertise PEP 658 metadata files (the one this
        project's machines reach does not), read a wheel's metadata with HTTP range requests instead of
        downloading it (torch's Linux wheel is 527 MB, its CUDA dependencies ~2 GB more);
    --no-cache-dir: nothing cached from another index or an earlier run answers for PyPI."""
    cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--isolated", "--no-cache-dir",
           "--disable-pip-version-check", "--use-feature=fast-deps", "--report", report_path,
           "--index-url", index_url]
    for url in extra_index_urls:
        cmd += ["--extra-index-url", url]
    return cmd + list(pip_args)


def pip_environment(environ: Optional[dict] = None) -> dict:
    env = dict(os.environ if environ is None else environ)
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def resolve(pip_args: Sequence[str], index_url: str = PYPI, extra_index_urls: Sequence[str] = (),
            timeout: float = 600, python: str = sys.executable) -> Tuple[dict, str]:
    """pip's report and its log (stdout and stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        cmd = pip_command(pip_args, report_path, index_url, extra_index_urls, python)
        try:
            proc = subprocess.run(cmd, env=pip_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ResolveError(f"pip did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0 or not os.path.exists(report_path):
            tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
            raise ResolveError(f"pip exited with {proc.returncode}:\n{tail}")
        with open(report_path) as f:
            return json.load(f), proc.stdout


def _override(env: EnvSpec, nvcc: Optional[str], gcc: Optional[str]) -> EnvSpec:
    conda = list(env.conda)
    if nvcc:
        conda = [s for s in conda if conda_spec_version([s], "cuda-nvcc") is None] + [f"cuda-nvcc={nvcc}"]
    if gcc:
        conda = [s for s in conda if not re.match(r"(\w+::)?(gcc|gxx)(_linux-64)?\b", s)] + [f"gxx_linux-64={gcc}"]
    return EnvSpec(conda=conda, pip=env.pip)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", default=os.path.join(ROOT, "environment.yml"))
    parser.add_argument("--report", help="check this pip --report file instead of resolving (no network)")
    parser.add_argument("--save-report", help="write the resolved report here")
    parser.add_argument("--index-url", default=PYPI)
    parser.add_argument("--extra-index-url", action="append", default=[],
                        help="e.g. https://download.pytorch.org/whl/cu126 for the CUDA 12.6 build of the same torch")
    parser.add_argument("--nvcc", help="check against this nvcc major.minor instead of environment.yml's")
    parser.add_argument("--gcc", help="check against this gcc major instead of environment.yml's")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    env_file = os.path.abspath(args.env_file)
    with open(env_file) as f:
        env = _override(parse_environment_yml(f.read()), args.nvcc, args.gcc)
    base = os.path.dirname(env_file)
    constraints = constraint_files(env.pip, base)
    if not constraints:
        print(f"FAIL  pin: the pip section of {env_file} passes no -c constraints file, so nothing pins torch")
        return 1
    pin = None
    for path in constraints:
        try:
            with open(path) as f:
                pin = read_pin(f.read())
            break
        except (OSError, ValueError):
            continue
    if pin is None:
        print(f"FAIL  pin: no torch==VERSION in {', '.join(constraints)}")
        return 1

    log = None
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
    else:
        try:
            report, log = resolve(pip_file_args(env.pip, base), args.index_url, args.extra_index_url, args.timeout)
        except ResolveError as e:
            print(f"FAIL  resolve: {e}")
            return 2
    if args.save_report:
        with open(args.save_report, "w") as f:
            json.dump(report, f)

    results = run_checks(report, pin, env) + ([check_downloads(log)] if log is not None else [])
    for result in results:
        print(result.line())
    failed = [r.name for r in results if not r.ok]
    shown = os.path.relpath(env_file)
    shown = env_file if shown.startswith("..") else shown
    print(f"GPU install check ({shown}, torch pin {pin}): "
          + (f"{len(failed)} of {len(results)} checks failed ({', '.join(failed)})" if failed
             else f"all {len(results)} checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
