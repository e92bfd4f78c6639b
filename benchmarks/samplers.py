"""Samplers at the same budget on the demo study: median over seeds of the best's held-out score
and of the trials needed to beat the hand-written baseline.

    .venv/bin/python benchmarks/samplers.py [--samplers tpe,cmaes,random,gp] [--seeds 0,1,2] [--n-trials 40]

Runs in one process: the parents' geometry and the lm-eval requests are built once and shared by
every study (each study is a fresh Optuna study in runs/samplers-<time>.db).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/demo.yaml")
    parser.add_argument("--samplers", default="tpe,cmaes,random,gp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-trials", type=int, default=40)
    args = parser.parse_args()

    from demos.models import build_demo_models
    from search import results
    from search.runner import Candidates, RunOptions, StudyRunner
    from search.storage import quiet_optuna
    from search.study_config import load_study_file

    torch.set_num_threads(1)
    quiet_optuna()
    build_demo_models(REPO / "runs" / "demo-models")
    study_file = load_study_file(args.study)
    candidates = Candidates(study_file, "cpu")
    storage = f"sqlite:///{REPO / 'runs' / f'samplers-{int(time.time())}.db'}"
    rows = []
    for sampler in args.samplers.split(","):
        held, passed, seconds = [], [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            options = RunOptions(storage=storage, study_name=f"{sampler}-{seed}", n_trials=args.n_trials,
                                 timeout=None, sampler=sampler, seed=seed, device="cpu", heartbeat=None)
            runner = StudyRunner(study_file, options, candidates)
            start = time.perf_counter()
            study = runner.open_study()
            runner.optimize(study)
            runner.ensure_holdout(study)
            seconds.append(time.perf_counter() - start)
            base, best = results.baseline_trial(study), results.best_trial(study)
            held.append(results.holdout_of(study, best)["score"])
            beat = [t.number for t in results.scored(study) if t.user_attrs["score"] > base.user_attrs["score"]]
            passed.append(min(beat) if beat else float("inf"))
            baseline_held = results.holdout_of(study, base)["score"]
            print(f"{sampler:>7} seed {seed}: best held-out {held[-1]:.4f} (baseline {baseline_held:.4f}), "
                  f"first trial above baseline #{passed[-1]}, {seconds[-1]:.0f} s", flush=True)
        rows.append((sampler, statistics.median(held), statistics.median(passed), statistics.median(seconds),
                     held, passed))
    print(f"\n{args.study}, {args.n_trials} trials, seeds {args.seeds}; held-out = weighted score on held-out items")
    print(f"{'sampler':>8} {'median best held-out':>21} {'median trials to beat baseline':>31} {'median s/study':>15}"
          f"  per seed (held-out / trial)")
    for sampler, held, passed, secs, hs, ps in sorted(rows, key=lambda r: -r[1]):
        per_seed = ", ".join(f"{h:.3f}/{p}" for h, p in zip(hs, ps, strict=True))
        print(f"{sampler:>8} {held:>21.4f} {passed:>31} {secs:>15.0f}  {per_seed}")


if __name__ == "__main__":
    main()
