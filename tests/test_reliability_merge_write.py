"""`search merge` under a real write failure (a file size limit, as a full disk): no partial OUT_DIR."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import yaml

from tests.conftest import REPO

LIMIT = 16 * 1024  # bytes per file: the tokenizer and config fit, the weights do not


def run_limited(args):
    """`search merge` whose files may not grow past LIMIT: the weights' write fails with EFBIG."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Python ignores it too: the write raises EFBIG

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "search.cli", "merge", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_merge_leaves_no_partial_output_when_a_write_fails(tiny_models, tmp_path):
    a, b = str(tiny_models["phi_a"]), str(tiny_models["phi_b"])
    config = {"merge_method": "slerp", "base_model": a, "dtype": "float32", "parameters": {"t": 0.5},
              "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}]}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_limited([str(path), str(out)])
    errors = [line for line in result.stderr.strip().splitlines() if "error:" in line]  # after the progress bar
    assert result.returncode == 2 and len(errors) == 1 and "File too large" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # staging removed
    ok = subprocess.run([sys.executable, "-m", "search.cli", "merge", str(path), str(out)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and (out / "config.json").is_file(), ok.stderr[-2000:]
