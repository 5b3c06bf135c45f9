"""setup.py: what it records about a build, and the build switches it refuses.

Each test runs setup.py's metadata command (egg_info, which compiles nothing) in a copy of the
source tree, so the checkout's extension and build record are left alone.
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path):
    """A copy of what setup.py reads: itself, pyproject.toml, the README and the package's
    Python files (no compiled extension, no build record)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "cpvt_kernels", tmp_path / "cpvt_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__",
                                                  "_build_info.py"))
    return tmp_path


def egg_info(tree, drop=(), **env):
    """setup.py egg_info in ``tree`` with ``env`` added to this environment, less the
    variables in ``drop`` and the build switches of the environment that runs the tests."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("CPVT_") and k not in drop}
    run_env.update(env)
    return subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base",
                           str(tree)], cwd=tree, env=run_env, capture_output=True, text=True,
                          timeout=300)


def test_metadata_commands_leave_the_build_record_alone(tree):
    """Only a build writes cpvt_kernels/_build_info.py: pip runs setup.py for metadata too,
    possibly from another environment's torch, and a record written then would make the
    package refuse an extension that matches the torch it runs with."""
    proc = egg_info(tree)
    assert proc.returncode == 0, proc.stderr
    assert (tree / "cpvt_kernels.egg-info").is_dir()
    assert not (tree / "cpvt_kernels" / "_build_info.py").exists()


@pytest.mark.parametrize("name,value", [("CPVT_BUILD_CPU", "Y"), ("CPVT_BUILD_CUDA", "auto"),
                                        ("CPVT_DEBUG", "2")])
def test_unknown_switch_values_stop_the_build(tree, name, value):
    """A typo in a build switch stops the build with a message naming it, rather than leaving
    kernels out without a word."""
    proc = egg_info(tree, **{name: value})
    assert proc.returncode != 0
    assert f"{name} must be 1 or 0" in proc.stderr and repr(value) in proc.stderr, proc.stderr


def test_cpu_arch_must_be_a_known_one(tree):
    proc = egg_info(tree, CPVT_CPU_ARCH="haswell")
    assert proc.returncode != 0
    assert "CPVT_CPU_ARCH must be one of native, generic, x86-64-v2, x86-64-v3, x86-64-v4, " \
           "got 'haswell'" in proc.stderr, proc.stderr


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 levels are for x86-64")
@pytest.mark.parametrize("arch", ["x86-64-v3", "GENERIC"])
def test_cpu_arch_takes_an_x86_64_level(tree, arch):
    proc = egg_info(tree, CPVT_CPU_ARCH=arch, CPVT_BUILD_CUDA="0")
    assert proc.returncode == 0, proc.stderr
    assert f"CPU kernels: yes ({arch.lower()})" in proc.stdout, proc.stdout


def fake_toolkit(root: Path, release: str) -> Path:
    """A folder that looks like a CUDA toolkit of ``release`` to setup.py: an nvcc that prints
    its version, and a libcudart."""
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.1"\n')
    nvcc.chmod(0o755)
    (root / "lib64" / "libcudart.so").write_bytes(b"")
    return root


def test_a_toolkit_of_another_major_cuda_version_is_named(tree, tmp_path):
    """torch's build refuses a toolkit of another major CUDA version than torch's own with a
    message that names neither switch nor remedy. Left to choose, setup.py leaves the CUDA
    kernels out and says why; asked for them (CPVT_BUILD_CUDA=1), it stops with the same
    reason; a toolkit of torch's major version (any minor) is used."""
    import torch
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: setup.py never looks at a toolkit")
    major = int(torch.version.cuda.split(".")[0])
    other = fake_toolkit(tmp_path / "cuda-other", f"{major - 1}.4")
    proc = egg_info(tree, CUDA_HOME=str(other))
    assert proc.returncode == 0, proc.stderr
    assert (f"CUDA kernels: no (auto: the CUDA toolkit at {other} is CUDA {major - 1}.4 and torch"
            in proc.stdout), proc.stdout
    assert f"set CUDA_HOME to a CUDA {major}.x toolkit" in proc.stdout
    proc = egg_info(tree, CUDA_HOME=str(other), CPVT_BUILD_CUDA="1")
    assert proc.returncode != 0
    assert (f"CPVT_BUILD_CUDA=1 but the CUDA toolkit at {other} is CUDA {major - 1}.4"
            in proc.stderr), proc.stderr
    same = fake_toolkit(tmp_path / "cuda-same", f"{major}.9")
    proc = egg_info(tree, CUDA_HOME=str(same))
    assert proc.returncode == 0, proc.stderr
    assert "CUDA kernels: yes (auto: torch CUDA build and toolkit found)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_a_toolkit_root_without_nvcc_is_named(tree, tmp_path, var):
    """A CUDA_HOME (or CUDA_PATH) that holds no nvcc used to count as a toolkit found: the build
    said it would compile the CUDA kernels, and torch's build then failed on the missing
    compiler. Left to choose, setup.py leaves them out and names the variable; asked for them,
    it stops with the same reason."""
    import torch
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: setup.py never looks at a toolkit")
    root = tmp_path / "not-a-toolkit"
    (root / "lib64").mkdir(parents=True)
    env = {var: str(root)}
    drop = ("CUDA_HOME", "CUDA_PATH")
    why = f"{var} is {root}, which has no bin/nvcc: set CUDA_HOME to the root of a CUDA toolkit"
    proc = egg_info(tree, drop, **env)
    assert proc.returncode == 0, proc.stderr
    assert f"CUDA kernels: no (auto: {why}" in proc.stdout, proc.stdout
    proc = egg_info(tree, drop, CPVT_BUILD_CUDA="1", **env)
    assert proc.returncode != 0
    assert f"CPVT_BUILD_CUDA=1 but {why}" in proc.stderr, proc.stderr


def test_source_distribution_holds_every_tracked_source(tmp_path):
    """The sdist (which `python -m build` builds its wheel from) has every source and header the
    extension compiles, the CUDA ones whatever this machine builds, and the tests, programs and
    CMake build; no build output or build record. It held only the .cpp files setup.py listed:
    a wheel built from it failed on the first missing header."""
    import tarfile
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    wanted = {f for f in listed if f.startswith(("csrc/", "tests/", "bench/", "python/",
                                                 "cpvt_kernels/"))
              and not f.startswith("bench/results/")} | {"setup.py", "pyproject.toml",
                                                         "README.md", "CMakeLists.txt"}
    src = tmp_path / "src"
    for f in wanted | {"MANIFEST.in"}:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, src / f)
    (src / "cpvt_kernels" / "_build_info.py").write_text("TORCH_VERSION = '0'\n")
    (src / "cpvt_kernels" / "_C.so").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPVT_")}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir",
                           str(tmp_path / "dist")], cwd=src, env=dict(env, CPVT_BUILD_CUDA="0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not wanted - names, sorted(wanted - names)
    assert any(n.endswith(".cuh") for n in names)
    assert "cpvt_kernels/_build_info.py" not in names and "cpvt_kernels/_C.so" not in names
