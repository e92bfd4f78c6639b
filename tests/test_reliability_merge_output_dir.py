"""`search merge`'s OUT_DIR under the mistakes and accidents a user meets: the current folder or a
folder holding the inputs given with --overwrite, a symbolic link, a run that fails or is stopped
(Ctrl-C, SIGTERM, a killed process's leftovers). Nothing the user had may be lost, and nothing
half-written may be left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli
from tests.merge_core.test_merge_bad_input import assert_refused


@pytest.fixture
def config(tiny_models, tmp_path) -> Path:
    a, b = str(tiny_models["phi_a"]), str(tiny_models["phi_b"])
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]}))
    return path


def _keepsakes(folder: Path) -> dict[str, str]:
    (folder / "notes.txt").write_text("mine")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "a.txt").write_text("also mine")
    return {"notes.txt": "mine", "data/a.txt": "also mine"}


def _intact(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text() == text, name


@pytest.mark.parametrize("out_dir", [".", "", "..", "./"])
def test_the_current_folder_as_out_dir_is_refused_even_with_overwrite(tmp_path, config, out_dir):
    work = tmp_path / "work"
    work.mkdir()
    files = _keepsakes(work)
    result = run_cli("merge", str(config), out_dir, "--overwrite", cwd=work)
    assert_refused(result, "output folder")
    _intact(work, files)
    assert config.is_file()
    assert sorted(p.name for p in work.iterdir()) == ["data", "notes.txt"]


def test_a_folder_holding_a_model_or_the_config_is_refused_with_overwrite(tmp_path, tiny_models, config):
    models = tiny_models["phi_a"].parent
    before = {p.name: p.stat().st_mtime_ns for p in models.rglob("*")}
    for out in (models, tiny_models["phi_a"], config.parent):
        assert_refused(run_cli("merge", str(config), str(out), "--overwrite"), "output folder", "replace")
    assert {p.name: p.stat().st_mtime_ns for p in models.rglob("*")} == before
    assert config.is_file()


def test_a_symbolic_link_to_a_folder_gets_the_model(tmp_path, config):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    done = run_cli("merge", str(config), str(link))
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and (link / "config.json").is_file() and (target / "model.safetensors").is_file()
    again = run_cli("merge", str(config), str(link), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert link.is_symlink() and (target / "config.json").is_file()


def test_a_failed_run_leaves_no_folders_it_made(tmp_path, config):
    broken = config.read_text().replace("phi_b", "phi_nowhere")
    config.write_text(broken)
    out = tmp_path / "new" / "deeper" / "model"
    assert_refused(run_cli("merge", str(config), str(out)), "phi_nowhere")
    assert not (tmp_path / "new").exists()


def _stopped(config: Path, out: Path, signum: int, delay: float, *args: str) -> subprocess.CompletedProcess:
    """`search merge` sent `signum` after `delay` seconds (its default handling restored, as a shell's
    foreground job has it)."""

    def defaults():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "search.cli", "merge", str(config), str(out), *args],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=defaults)
    time.sleep(delay)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("delay", [0.15, 0.3, 0.6, 1.2])
def test_a_stopped_merge_ends_in_one_line_with_nothing_half_written(tmp_path, config, signum, code, delay):
    """Early signals land in torch's and transformers' imports, later ones in the merge: each ends the
    run at the next tensor, and an existing OUT_DIR given with --overwrite stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    files = _keepsakes(out)
    result = _stopped(config, out, signum, delay, "--overwrite")
    if result.returncode == 0:  # the merge finished before the signal came: a whole model
        assert (out / "config.json").is_file()
        return
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "interrupted" in line or "error" in line]
    assert errors == ["search: interrupted; nothing was written"], result.stderr[-3000:]
    _intact(out, files)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_killed_runs_staging_folder_goes_with_the_next_run(tmp_path, config):
    """SIGKILL cannot be caught: its staging folder stays until the next merge into that OUT_DIR finds
    its process gone. A live process's staging folder (another merge writing there) is left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".out.partial-{os.getpid()}-def456"
    live.mkdir()
    done = run_cli("merge", str(config), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and live.exists()
