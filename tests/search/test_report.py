"""`search report`: an offline HTML page and PNG images of a finished study; bad input is one line, exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest

from tests.conftest import run_cli
from tests.search.conftest import study_dict, write_study

FIGURES = ("t-gradient", "history", "task-scores", "importance")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def finished(study_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    path = write_study(tmp / "study.yaml", study_dict(study_parts, tmp, study={"n_trials": 5}))
    result = run_cli("start", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path, tmp


@pytest.fixture(scope="module")
def report(finished, tmp_path_factory):
    path, _ = finished
    out = tmp_path_factory.mktemp("report-out") / "report"
    result = run_cli("report", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


class Outside(HTMLParser):
    """Every URL the page would fetch: script/img/iframe src, stylesheet links."""

    def __init__(self):
        super().__init__()
        self.fetched: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag in ("script", "img", "iframe", "embed", "source") and attrs.get("src"):
            self.fetched.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.fetched.append(attrs["href"])


def test_writes_html_and_one_png_per_figure(report, tmp_path):
    from PIL import Image

    out, result = report
    assert "index.html" in result.stdout
    for name in FIGURES:
        png = out / f"{name}.png"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 1000 and image.height >= 300
    keep = Path(os.environ.get("MERGE_SEARCH_ARTIFACTS") or tmp_path)
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "t-gradient.png", keep / "report-t-gradient.png")
    print(f"report gradient figure: {keep / 'report-t-gradient.png'}")


def test_html_is_self_contained(report):
    out, _ = report
    page = (out / "index.html").read_text()
    parser = Outside()
    parser.feed(page)
    assert parser.fetched == [], f"the report fetches {parser.fetched}"
    assert parser.scripts >= 1 + len(FIGURES)  # plotly.js inline, then one per figure
    for name in FIGURES:
        assert f'id="{name}"' in page
    assert "t across the layers" in page and "baseline" in page and "mergekit-yaml" in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_html_renders_offline(report):
    out, _ = report
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        result = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                                 (out / "index.html").as_uri()], capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.stdout.count('class="main-svg"') >= len(FIGURES), result.stderr[-2000:]


def test_study_without_trials_gets_placeholder_figures(finished, tmp_path):
    _, tmp = finished
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp / 'toy.db'}", direction="maximize")
    result = run_cli("report", "--storage", f"sqlite:///{tmp / 'toy.db'}", "--study-name", "empty",
                     "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(["index.html", *(f"{n}.png" for n in FIGURES)])
    assert "no fully scored trial yet" in (tmp_path / "r" / "index.html").read_text()


@pytest.mark.parametrize("kind", ["file", "below a file"])
def test_unwritable_out_is_one_line(finished, tmp_path, kind):
    path, _ = finished
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "report"
    result = run_cli("report", str(path), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("search report: error: --out") and result.stderr.count("\n") == 1, result.stderr


def test_unknown_study_is_one_line(finished, tmp_path):
    _, tmp = finished
    result = run_cli("report", "--storage", f"sqlite:///{tmp / 'toy.db'}", "--study-name", "nope",
                     "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "no study named 'nope'" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "r").exists()


def test_t_curve_restarts_the_gradient_in_each_slice():
    # Slice lengths come from the plan now (MergePlan.slice_lengths), not from re-reading the YAML.
    from search.figures import t_curve

    assert t_curve([0.0, 1.0], [3, 2]) == ([0, 1, 2, 3, 4], [0.0, 0.5, 1.0, 0.0, 1.0])
    assert t_curve(0.3, [2]) == ([0, 1], [0.3, 0.3])


def test_t_curve_without_slices_is_over_relative_depth():
    from search.figures import t_curve

    assert t_curve([0.0, 0.5, 0.3, 0.7, 1.0], None) == ([0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.5, 0.3, 0.7, 1.0])
    assert t_curve(0.5, None) == ([0.0, 1.0], [0.5, 0.5])


def test_searched_curves_group_anchors_and_skip_switches():
    import optuna

    from search.figures import searched_curves

    trial = optuna.trial.create_trial(
        params={"weight.child_1.mlp.0": 0.2, "weight.child_1.mlp.1": 0.8, "t.default.0": 0.5,
                "int8_mask.default": True},
        distributions={"weight.child_1.mlp.0": optuna.distributions.FloatDistribution(0, 1),
                       "weight.child_1.mlp.1": optuna.distributions.FloatDistribution(0, 1),
                       "t.default.0": optuna.distributions.FloatDistribution(0, 1),
                       "int8_mask.default": optuna.distributions.CategoricalDistribution([True, False])},
        value=1.0)
    assert searched_curves(trial) == {"weight.child_1.mlp": [0.2, 0.8], "t.default": [0.5]}


def test_block_values_are_steps_over_the_layers():
    from search.figures import Blocks, searched_curves, t_curve

    trial = optuna.trial.create_trial(params={"weight.a.mlp.b0": 0.1, "weight.a.mlp.b1": 0.9, "t.default.0": 0.5},
                                      distributions={n: optuna.distributions.FloatDistribution(0, 1) for n in
                                                     ("weight.a.mlp.b0", "weight.a.mlp.b1", "t.default.0")},
                                      value=0.0)
    curves = searched_curves(trial)
    assert isinstance(curves["weight.a.mlp"], Blocks) and curves["weight.a.mlp"] == [0.1, 0.9]
    assert t_curve(curves["weight.a.mlp"], [5]) == ([0, 1, 2, 3, 4], [0.1, 0.1, 0.9, 0.9, 0.9])
    assert t_curve(curves["weight.a.mlp"], None) == ([0.0, 0.5, 0.5, 1.0], [0.1, 0.1, 0.9, 0.9])
