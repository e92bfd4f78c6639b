"""`search dashboard` in headless Chromium: the study, its trials, the note, the figures, the YAML artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO, run_cli
from tests.search.conftest import study_dict, write_study

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
# What works headless as root, with nothing reaching the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=20000"]


@pytest.fixture(scope="module")
def finished(study_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    path = write_study(tmp / "study.yaml", study_dict(study_parts, tmp, study={"n_trials": 5}))
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path, tmp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(finished):
    """The dashboard server as a user starts it; yields (study page URL, log path)."""
    path, tmp = finished
    port = free_port()
    log = tmp / "dashboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", str(path), "--port", str(port)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="200"))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            match = re.search(r"open (http://\S+/dashboard/studies/\d+)", log.read_text())
            if match:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=5).read()
                    break
                except OSError:
                    pass
            assert time.monotonic() < deadline, f"dashboard did not come up: {log.read_text()}"
            time.sleep(0.5)
        yield match.group(1), log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def text_of(dom: str) -> str:
    """The page's text: code blocks are syntax-highlighted, one span per token."""
    return re.sub(r"<[^>]+>", "", dom)


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MERGE_SEARCH_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_prints_the_study_url(dashboard, finished):
    url, log = dashboard
    text = log.read_text()
    assert url.endswith("/dashboard/studies/1")
    assert f"artifacts in {finished[1] / 'toy-artifacts'}" in text


def test_study_page_shows_objective_and_figures(dashboard, tmp_path):
    url, _ = dashboard
    dom = chromium(url, "--window-size=1400,2600", "--dump-dom").stdout
    assert "toy" in dom
    assert "weighted score" in dom  # the study's metric name, on the history plot's axis
    assert "t across the layers" in dom and "self_attn" in dom  # our gradient figure, drawn by plotly.js
    assert "per-task scores" in dom and "optimisation history" in dom
    shot = artifacts_dir(tmp_path) / "dashboard-study.png"
    result = chromium(url, "--window-size=1400,2600", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    print(f"dashboard screenshot: {shot}")


def test_note_page_shows_baseline_against_best(dashboard):
    url, _ = dashboard
    dom = text_of(chromium(f"{url}/note", "--window-size=1400,1400", "--dump-dom").stdout)
    assert "merge-search: toy" in dom
    assert "baseline search" in dom and "best held-out" in dom
    assert "Rebuild the best merge" in dom and "mergekit-yaml" in dom and "--top 1" in dom


def test_trials_page_lists_trials_and_yaml_artifact(dashboard, finished):
    url, _ = dashboard
    dom = chromium(f"{url}/trials", "--window-size=1400,1400", "--dump-dom").stdout
    for number in range(5):
        assert f"Trial {number}" in dom
    assert "trial0-mergekit.yml" in dom  # the selected trial's artifact card


def test_every_trial_carries_its_mergekit_yaml(dashboard, finished):
    url, _ = dashboard
    base = url.split("/dashboard/")[0]
    _, tmp = finished
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp / 'toy.db'}")
    for trial in study.trials:
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
        assert [m.filename for m in metas] == [f"trial{trial.number}-mergekit.yml"]
        served = urllib.request.urlopen(f"{base}/artifacts/1/{trial._trial_id}/{metas[0].artifact_id}").read()
        assert served.decode() == trial.user_attrs["mergekit_yaml"]


def test_note_and_figures_are_stored_on_the_study(finished):
    from optuna_dashboard import get_note

    _, tmp = finished
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp / 'toy.db'}")
    note = get_note(study)
    best = max((t for t in study.trials if "score" in t.user_attrs), key=lambda t: (t.user_attrs["score"], -t.number))
    assert f"Best: **trial {best.number}**" in note
    assert f"01-trial{best.number}.yml" in note
    attrs = study._storage.get_study_system_attrs(study._study_id)
    stored = {k.split(":")[2] for k in attrs if k.startswith("dashboard:plot_data:")}
    assert stored == {"t-gradient", "history", "task-scores", "importance"}
    prefix = "dashboard:plot_data:t-gradient:"
    chunks = sorted((int(k.removeprefix(prefix)), v) for k, v in attrs.items() if k.startswith(prefix))
    figure = json.loads("".join(v for _, v in chunks))
    assert figure["layout"]["title"]["text"].startswith(f"t across the layers: best trial {best.number}")
