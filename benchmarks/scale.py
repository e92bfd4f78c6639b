"""Trials per hour with 1, 2 and 3 workers sharing one study on PostgreSQL.

    MERGE_SEARCH_PG_URL=postgresql+psycopg2://... .venv/bin/python benchmarks/scale.py [--trials 12]

Each worker is a `search start` process on the same study (the demo study by default). Prints the
wall time of the whole run and the steady-state rate (first trial start to last trial end), both
as trials per hour and as a ratio against one worker measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent


def run_workers(study: str, url: str, name: str, workers: int, trials: int) -> tuple[float, float, int]:
    """(wall seconds, steady-state seconds, finished trials) of `workers` processes on one study."""
    cmd = [sys.executable, "-m", "search.cli", "start", study, "--storage", url, "--study-name", name,
           "--n-trials", str(trials)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"worker failed: {err[-2000:]}")
    wall = time.perf_counter() - start
    done = [t for t in optuna.load_study(study_name=name, storage=url).trials
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    steady = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return wall, steady, len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/demo.yaml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--url", default=os.environ.get("MERGE_SEARCH_PG_URL"))
    args = parser.parse_args()
    if not args.url:
        sys.exit("set MERGE_SEARCH_PG_URL or --url to a PostgreSQL database (.ci/start-postgres.sh starts one)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stamp = int(time.time())
    rows = []
    for workers in (1, 2, 3):
        wall, steady, done = run_workers(args.study, args.url, f"scale-{stamp}-{workers}", workers, args.trials)
        rows.append((workers, done, wall, steady))
    print(f"{args.study}, {args.trials} trials per run, PostgreSQL, {os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'trials':>6} {'wall s':>8} {'trials/h (wall)':>16} {'x 1 worker':>10} "
          f"{'trials/h (steady)':>18} {'x 1 worker':>10}")
    base_wall, base_steady = rows[0][1] / rows[0][2], rows[0][1] / rows[0][3]
    for workers, done, wall, steady in rows:
        print(f"{workers:>7} {done:>6} {wall:>8.1f} {3600 * done / wall:>16.0f} {done / wall / base_wall:>10.2f} "
              f"{3600 * done / steady:>18.0f} {done / steady / base_steady:>10.2f}")


if __name__ == "__main__":
    main()
