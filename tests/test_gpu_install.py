"""The GPU install: one torch pin for the CPU and GPU installs, and scripts/check_gpu_install.py.

The unit tests feed the checks small hand-written pip reports (no network), each mismatch the checks
must catch included. The `network` test resolves environment.yml's pip part against PyPI with pip's
dry-run report (metadata only, about 20 s) and runs the same checks on it; it is skipped when PyPI
cannot be reached, and fails then instead when REMAX_REQUIRE_NETWORK=1.
"""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_gpu_install as cgi  # noqa: E402
from check_gpu_install import EnvSpec, parse_environment_yml  # noqa: E402

from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

LINUX_311 = {
    "implementation_name": "cpython", "implementation_version": "3.11.7", "os_name": "posix",
    "platform_machine": "x86_64", "platform_release": "6.1", "platform_system": "Linux", "platform_version": "#1",
    "python_full_version": "3.11.7", "platform_python_implementation": "CPython", "python_version": "3.11",
    "sys_platform": "linux",
}


def dist(name, version, requires=(), url=None, requested_extras=None):
    entry = {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
             "download_info": {"url": url or f"https://files.example/{name}-{version}-py3-none-any.whl"}}
    if requested_extras:
        entry["requested_extras"] = list(requested_extras)
    return entry


def report(*dists, environment=LINUX_311):
    return {"version": "1", "install": list(dists), "environment": dict(environment)}


# The shapes of the real entries (requires_dist lines as PyPI's torch 2.13.0 and PyTorch's cu126 build state them).
TORCH_CU130 = dist("torch", "2.13.0", [
    "filelock", "sympy>=1.13.3",
    'cuda-toolkit[cublas,cudart,cufft,curand,cusolver,cusparse,nvrtc]==13.0.3; platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
    'optree>=0.13.0; extra == "optree"',
], url="https://files.pythonhosted.org/packages/01/79/x/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl")
TORCH_CU126 = dist("torch", "2.13.0+cu126", [
    "filelock",
    "nvidia-cuda-runtime-cu12==12.6.77; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "nvidia-cublas-cu12==12.6.4.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
])
TORCH_CPU = dist("torch", "2.13.0+cpu", ["filelock", "sympy>=1.13.3", 'optree>=0.13.0; extra == "optree"'])
TRANSFORMERS = dist("transformers", "5.24.0", [
    "huggingface-hub>=1.0", 'torch>=2.6; extra == "torch"', 'accelerate>=1.1.0; extra == "torch"',
    'torch>=2.6; extra == "testing"',
])
DEEPSPEED = dist("deepspeed", "0.19.8", ["torch>=2.0.0", 'torchvision; extra == "dev"'])
ACCELERATE = dist("accelerate", "1.15.0", ["torch>=2.0.0", "numpy"])
# datasets 5.2's benchmarks extra pins an old torch: extras other than `torch` must not count
DATASETS = dist("datasets", "5.2.0", ['torch; extra == "torch"', 'torch==2.0.1; extra == "benchmarks"'])

ENV_TEXT = """\
# a GPU env
name: remax
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - cuda-version=13.0      # a comment
  - "cuda-nvcc=13.0"
  - nvidia::cuda-toolkit=13.0
  - ninja
  - gcc_linux-64=14
  - gxx_linux-64=14
  - pip:
      - -c constraints.txt
      - -r requirements.txt
variables:
  FOO: bar
"""


def env_with(**replace):
    """ENV_TEXT parsed, with some conda specs swapped (key: the package, value: the new spec)."""
    env = parse_environment_yml(ENV_TEXT)
    conda = []
    for spec in env.conda:
        name = re.split(r"[=<> ]", spec.split("::")[-1])[0]
        conda.append(replace.get(name.replace("-", "_"), spec))
    return EnvSpec(conda=conda, pip=env.pip)


GOOD = report(TORCH_CU130, TRANSFORMERS, DEEPSPEED, ACCELERATE, DATASETS)
PIN = "2.13.0"


# --- reading the files -------------------------------------------------------------------------

def test_parse_environment_yml_handwritten():
    env = parse_environment_yml(ENV_TEXT)
    assert env.conda == ["python=3.11", "pip", "cuda-version=13.0", "cuda-nvcc=13.0", "nvidia::cuda-toolkit=13.0",
                         "ninja", "gcc_linux-64=14", "gxx_linux-64=14"]
    assert env.pip == ["-c constraints.txt", "-r requirements.txt"]


def test_parse_environment_yml_reads_the_real_file_as_yaml_does():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "environment.yml").read_text()
    deps = yaml.safe_load(text)["dependencies"]
    expected_conda = [d for d in deps if isinstance(d, str)]
    expected_pip = [p for d in deps if isinstance(d, dict) for p in d["pip"]]
    env = parse_environment_yml(text)
    assert (env.conda, env.pip) == (expected_conda, expected_pip)


@pytest.mark.parametrize("spec,name,version", [
    ("cuda-nvcc=13.0", "cuda-nvcc", "13.0"),
    ("nvidia::cuda-nvcc=12.4", "cuda-nvcc", "12.4"),
    ("conda-forge::cuda-nvcc 13.0.*", "cuda-nvcc", "13.0"),
    ("cuda-nvcc>=13.0,<13.1", "cuda-nvcc", "13.0"),
    ("cuda-nvcc==13.0.88=h1234_0", "cuda-nvcc", "13.0.88"),
    ("cuda-nvcc", "cuda-nvcc", None),
    ("cuda-nvcc-tools=13.0", "cuda-nvcc", None),  # another package
    ("gxx_linux-64=14", "gxx_linux-64", "14"),
    ("python=3.11", "python", "3.11"),
])
def test_conda_spec_version(spec, name, version):
    assert cgi.conda_spec_version([spec], name) == version


def test_read_pin():
    assert cgi.read_pin("# comment\nnumpy<3\ntorch==2.13.0  # the tested one\n") == "2.13.0"
    with pytest.raises(ValueError):
        cgi.read_pin("torch>=2.6\n")


def test_pip_file_args_are_relative_to_the_env_file(tmp_path):
    args = cgi.pip_file_args(["-c constraints.txt", "-r requirements.txt", "tqdm==4.70.1",
                              "--extra-index-url https://example/simple"], str(tmp_path))
    assert args == ["-c", str(tmp_path / "constraints.txt"), "-r", str(tmp_path / "requirements.txt"),
                    "tqdm==4.70.1", "--extra-index-url", "https://example/simple"]
    assert cgi.constraint_files(["-c constraints.txt"], str(tmp_path)) == [str(tmp_path / "constraints.txt")]


# --- the pins are written once -----------------------------------------------------------------

def test_one_torch_pin_for_the_cpu_and_the_gpu_install():
    pin = cgi.read_pin((ROOT / "constraints.txt").read_text())
    # the CPU suite runs that version (the CPU build of it)
    assert Version(importlib.metadata.version("torch")).public == pin
    # requirements.txt states a floor, no version of its own
    torch_lines = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
                   if re.match(r"\s*torch\b", line)]
    assert len(torch_lines) == 1 and not any(s.operator == "==" for s in torch_lines[0].specifier)
    assert torch_lines[0].specifier.contains(pin)
    # the GPU install passes the same constraints file
    env = parse_environment_yml((ROOT / "environment.yml").read_text())
    assert cgi.constraint_files(env.pip, str(ROOT)) == [str(ROOT / "constraints.txt")]
    assert "-r requirements.txt" in env.pip
    # and so does the Makefile's CPU install, whose stamp depends on it
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): requirements\.txt constraints\.txt$", makefile, re.M)
    assert makefile.count("-c constraints.txt") == 2
    assert not list(ROOT.glob("constraints-*.txt"))


def test_make_install_takes_the_cpu_build_of_the_pin():
    pin = cgi.read_pin((ROOT / "constraints.txt").read_text())
    out = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # torch==<pin>+cpu: no CUDA wheel (PyPI's carry no +cpu label) can satisfy it
    assert f'pip install -q -c constraints.txt "torch=={pin}+cpu"' in out
    assert "pip install -q -c constraints.txt -r requirements.txt" in out


def test_requirements_torch_floor_is_at_least_transformers_own():
    """transformers disables PyTorch below its `torch` extra's floor (`torch>=2.6` for 5.24)."""
    floors = [Requirement(r) for r in importlib.metadata.requires("transformers") or []]
    floor = [r for r in floors if r.name == "torch" and r.marker and r.marker.evaluate({"extra": "torch"})]
    assert floor, "transformers states no torch requirement for its torch extra"
    transformers_min = min(Version(s.version) for s in floor[0].specifier if s.operator == ">=")
    ours = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if re.match(r"\s*torch\b", line)][0]
    assert min(Version(s.version) for s in ours.specifier if s.operator == ">=") >= transformers_min


# --- the checks on hand-written reports --------------------------------------------------------

def test_all_checks_pass_on_the_expected_resolution():
    results = cgi.run_checks(GOOD, PIN, env_with())
    assert all(r.ok for r in results), "\n".join(r.line() for r in results)
    nvcc = next(r for r in results if r.name == "nvcc")
    assert "13.0" in nvcc.message and "cuda-toolkit" in nvcc.message


def test_torch_version_mismatch_fails():
    resolved_212 = report(dist("torch", "2.12.0", TORCH_CU130["metadata"]["requires_dist"]), TRANSFORMERS)
    result = cgi.check_torch_version(resolved_212, PIN)
    assert not result.ok and "2.12.0" in result.message and "2.13.0" in result.message
    assert cgi.check_torch_version(report(TORCH_CU126), PIN).ok  # a local label is the same version
    assert not cgi.check_torch_version(report(TRANSFORMERS), PIN).ok  # no torch at all


@pytest.mark.parametrize("torch,expected", [
    (TORCH_CU130, (13, 0)), (TORCH_CU126, (12, 6)), (TORCH_CPU, None),
    (dist("torch", "2.13.0", ['nvidia-nccl-cu13==2.29.7; platform_system == "Linux"']), (13, None)),
])
def test_torch_cuda_version(torch, expected):
    assert cgi.torch_cuda_version(report(torch))[0] == expected


def test_torch_cuda_version_follows_the_markers():
    mac = dict(LINUX_311, sys_platform="darwin", platform_system="Darwin", platform_machine="arm64")
    assert cgi.torch_cuda_version(report(TORCH_CU130, environment=mac))[0] is None


def test_nvcc_12_against_torch_cuda_13_fails():
    result = cgi.check_nvcc(GOOD, env_with(cuda_nvcc="cuda-nvcc=12.4", cuda_version="cuda-version=12.4"))
    assert not result.ok
    assert "13.0" in result.message and "12.4" in result.message and "CUDAMismatchException" in result.message


def test_nvcc_minor_mismatch():
    # CUDA 13: DeepSpeed 0.19.8 accepts no other minor
    assert not cgi.check_nvcc(GOOD, env_with(cuda_nvcc="cuda-nvcc=13.2")).ok
    # CUDA 12: its list of compatible minors holds 12.4 and 12.6
    assert cgi.check_nvcc(report(TORCH_CU126), env_with(cuda_nvcc="cuda-nvcc=12.4")).ok
    assert cgi.check_nvcc(report(TORCH_CU126), env_with(cuda_nvcc="cuda-nvcc=12.6")).ok


def test_nvcc_against_a_cpu_torch_or_without_nvcc_fails():
    result = cgi.check_nvcc(report(TORCH_CPU), env_with())
    assert not result.ok and "CPU build" in result.message
    no_nvcc = EnvSpec(conda=["python=3.11", "pip", "ninja"], pip=[])
    assert not cgi.check_nvcc(GOOD, no_nvcc).ok


def test_a_package_requiring_a_newer_torch_fails():
    needs_214 = dist("newlib", "1.0", ["torch>=2.14"])
    result = cgi.check_torch_requirements(report(TORCH_CU130, DEEPSPEED, needs_214), PIN)
    assert not result.ok and "newlib 1.0 needs torch>=2.14" in result.message
    assert "deepspeed" not in result.message  # only the unmet ones are named


def test_torch_extra_counts_other_extras_do_not():
    # transformers' torch extra (torch>=2.6) is what transformers enforces at import: it counts
    result = cgi.check_torch_requirements(report(TRANSFORMERS), "2.5.1")
    assert not result.ok and "transformers 5.24.0 needs torch>=2.6" in result.message
    # datasets' benchmarks extra (torch==2.0.1) is not installed: it does not
    assert cgi.check_torch_requirements(report(DATASETS), PIN).ok
    # an extra the resolution requested counts
    requested = dist("lib", "1", ['torch>=3; extra == "gpu"'], requested_extras=["gpu"])
    assert not cgi.check_torch_requirements(report(requested), PIN).ok


@pytest.mark.parametrize("nvcc,gcc,ok", [
    ("13.0", "14", True), ("13.0", "15", True), ("13.0", "16", False),
    ("12.6", "14", False), ("12.6", "13", True), ("13.0", "8", False), ("13.5", "14", False),
])
def test_host_compiler(nvcc, gcc, ok):
    env = env_with(cuda_nvcc=f"cuda-nvcc={nvcc}", gcc_linux_64=f"gcc_linux-64={gcc}", gxx_linux_64=f"gxx_linux-64={gcc}")
    assert cgi.check_host_compiler(env).ok is ok


def test_platform():
    assert cgi.check_platform(GOOD, env_with()).ok
    mac = dict(LINUX_311, sys_platform="darwin", platform_machine="arm64")
    assert not cgi.check_platform(report(TORCH_CU130, environment=mac), env_with()).ok
    py312 = dict(LINUX_311, python_version="3.12")
    assert not cgi.check_platform(report(TORCH_CU130, environment=py312), env_with()).ok


def test_whole_downloads_and_the_metadata_only_check():
    log = ("Collecting torch\n  Obtaining dependency information from torch 2.13.0\n"
           "  Downloading deepspeed-0.19.8.tar.gz (2.0 MB)\n    Downloading setuptools-84.2.1-py3-none-any.whl (876 kB)\n")
    assert cgi.whole_downloads(log) == [("deepspeed-0.19.8.tar.gz", 2.0e6), ("setuptools-84.2.1-py3-none-any.whl", 876e3)]
    assert cgi.check_downloads(log).ok
    full = log + "  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (526.6 MB)\n"
    result = cgi.check_downloads(full)
    assert not result.ok and "torch-2.13.0" in result.message


def test_pip_command_sees_only_pypi():
    cmd = cgi.pip_command(["-r", "requirements.txt"], "/tmp/r.json")
    for option in ("--dry-run", "--ignore-installed", "--isolated", "--no-cache-dir", "--use-feature=fast-deps"):
        assert option in cmd
    assert cmd[cmd.index("--index-url") + 1] == "https://pypi.org/simple"
    assert cmd[cmd.index("--report") + 1] == "/tmp/r.json"
    env = cgi.pip_environment({"PIP_FIND_LINKS": "/opt/wheels", "PATH": "/bin"})
    assert env["PIP_CONFIG_FILE"] == os.devnull  # no pip.conf, global or not; --isolated drops PIP_FIND_LINKS


def test_cli_on_a_mismatched_environment_file(tmp_path, capsys):
    """`python scripts/check_gpu_install.py` against an environment.yml copy with nvcc 12.4, on a saved report."""
    text = (ROOT / "environment.yml").read_text()
    text = text.replace("cuda-nvcc=13.0", "cuda-nvcc=12.4").replace("cuda-version=13.0", "cuda-version=12.4")
    text = text.replace("-c constraints.txt", f"-c {ROOT / 'constraints.txt'}")
    env_file = tmp_path / "environment.yml"
    env_file.write_text(text)
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(GOOD))
    assert cgi.main(["--env-file", str(env_file), "--report", str(saved)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL  nvcc: torch's CUDA 13\.0 .* nvcc 12\.4 .*CUDAMismatchException", out, re.M)
    assert re.search(r"^ok    torch-version: ", out, re.M)
    # gcc 14 is also past what nvcc 12.4 accepts
    assert re.search(r"^FAIL  host-compiler: gxx_linux-64 14, outside what nvcc 12\.4 .*gcc 9 to 13", out, re.M)
    assert "2 of 5 checks failed (nvcc, host-compiler)" in out
    # the real file passes on the same report
    assert cgi.main(["--report", str(saved)]) == 0


# --- the real resolution against PyPI ----------------------------------------------------------

def pypi_unreachable(timeout=4.0):
    """None when PyPI answers within `timeout` seconds, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(cgi.PYPI + "/pip/", method="HEAD"), timeout=timeout):
            return None
    except Exception as e:  # any failure to reach it: DNS, refused, TLS, timeout, HTTP error
        return f"{type(e).__name__}: {e}"


def require_pypi():
    """Skip (or, with REMAX_REQUIRE_NETWORK=1, fail) when PyPI does not answer within a few seconds."""
    problem = pypi_unreachable()
    if problem is not None:
        message = f"PyPI cannot be reached ({problem})"
        if os.environ.get("REMAX_REQUIRE_NETWORK") == "1":
            pytest.fail(message + " and REMAX_REQUIRE_NETWORK=1")
        pytest.skip(message + "; set REMAX_REQUIRE_NETWORK=1 to make this a failure")


@pytest.mark.network
def test_gpu_install_resolves_from_pypi_to_the_tested_torch():
    require_pypi()
    env = parse_environment_yml((ROOT / "environment.yml").read_text())
    start = time.monotonic()
    report_, log = cgi.resolve(cgi.pip_file_args(env.pip, str(ROOT)), timeout=300)
    seconds = time.monotonic() - start
    pin = cgi.read_pin((ROOT / "constraints.txt").read_text())
    results = cgi.run_checks(report_, pin, env) + [cgi.check_downloads(log)]
    summary = "\n".join(r.line() for r in results) + f"\n(resolution took {seconds:.0f} s)"
    assert all(r.ok for r in results), summary
    # it saw PyPI's Linux x86_64 torch wheel, not the CPU build on this machine's disk
    torch = cgi.report_packages(report_)["torch"]
    url = torch["download_info"]["url"]
    assert url.startswith("https://files.pythonhosted.org/") and url.endswith("manylinux_2_28_x86_64.whl"), url
    assert "+" not in torch["metadata"]["version"]
    # deepspeed is an sdist: pip built its metadata
    assert cgi.report_packages(report_)["deepspeed"]["download_info"]["url"].endswith(".tar.gz")
