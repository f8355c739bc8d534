"""The package installs whole: `pip install .` (not editable) ships every subpackage.

The cheap check asks setuptools which packages pyproject.toml selects and compares them with
the directories under minisdpo/ that hold an __init__.py. The slow one (pytest -m slow) does a
real non-editable install of a copy of the repository into a fresh virtual environment, builds
the extension there, and runs `python -m minisdpo.bench --help` from another directory.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_selects_every_subpackage():
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' notes about distutils and its own betas
        packages = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]["packages"]
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "minisdpo").rglob("__init__.py")}
    assert "minisdpo.bench" in on_disk
    assert sorted(packages) == sorted(on_disk)


def _copy_of_the_repository(dest: Path) -> Path:
    """The tracked and untracked source files, without builds, caches or virtual environments."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", "runs",
                                    ".pytest_cache")
    return Path(shutil.copytree(ROOT, dest / "repo", ignore=ignore))


@pytest.mark.slow
def test_non_editable_install_runs_the_bench_module(tmp_path):
    repo = _copy_of_the_repository(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    child_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    # torch, setuptools and pip come from this interpreter's environment (itself often a virtual
    # environment, whose packages --system-site-packages would not reach): its site directories
    # go on the new environment's path, after the new environment's own, where minisdpo lands.
    # The .pth files of those directories are not run, so an editable minisdpo there stays out.
    Path(child_site, "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["MINISDPO_NO_CUDA"] = "1"  # the CPU extension is enough to show what the package ships
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str) -> str:
        out = subprocess.run([str(python), *args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"python {' '.join(args)}:\n{out.stdout}{out.stderr}"
        return out.stdout

    run("-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--disable-pip-version-check",
        str(repo))
    where = run("-c", "import minisdpo.bench, minisdpo._C; print(minisdpo.bench.__file__)").strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not a source tree
    assert "usage: python -m minisdpo.bench" in run("-m", "minisdpo.bench", "--help")
