"""setup.py: what it records about a build, and the build switches it refuses.

Each test runs setup.py's metadata command (egg_info, which compiles nothing) in a copy of the
source tree, so the checkout's extension and build record are left alone.
"""
import os
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


def egg_info(tree, **env):
    # The build switches of the environment that runs the tests are not this test's.
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("CPVT_")}
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


def test_cpu_arch_must_be_native_or_generic(tree):
    proc = egg_info(tree, CPVT_CPU_ARCH="haswell")
    assert proc.returncode != 0
    assert "CPVT_CPU_ARCH must be 'native' or 'generic', got 'haswell'" in proc.stderr
