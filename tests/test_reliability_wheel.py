"""The built wheel, installed into a fresh venv, runs the demo from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_wheel_runs_the_demo_from_an_empty_folder(tmp_path):
    # Build from a clean copy: setuptools' build/ folder in the checkout may hold stale files.
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".*_cache", "docs", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(dist.glob("merge_search-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    # The dependencies come from this test's environment (read-only, behind the wheel's own files);
    # the package itself only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    installed = site / "search" / "_studies" / "demo.yaml"
    assert installed.is_file() and (site / "search" / "_studies" / "demo" / "data" / "demo_letters.jsonl").is_file()

    work = tmp_path / "empty"
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="")
    where = subprocess.run([str(python), "-c", "import search; print(search.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))  # not the checkout
    search = str(env_dir / "bin" / "search")
    demo = subprocess.run([search, "demo", "--n-trials", "3"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (work / "runs" / "demo.db").is_file() and (work / "runs" / "demo-models" / "BUILD").is_file()
    dry = subprocess.run([search, "start", str(installed), "--dry-run"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
