"""A chain searched jointly against its stages tuned one after another, at the same number of trials.

    .venv/bin/python benchmarks/chain_search.py [--study studies/demo-chain.yaml] [--seeds 0,1,2] [--n-trials 60]

Joint: one Optuna study over every stage's parameters (what a chain study does). Staged: the
budget split evenly over the stages in chain order; stage 1 is tuned with the later stages at
their hand-written values, then stage 2 with stage 1 fixed at its best, and so on. Both arms start
from the hand-written chain, given to the sampler as a known point (scored once, outside the
budget), and take the same sampler and seed; neither prunes, so every trial scores all search items.
The pick of each arm is its best on the search items; the table gives its score on the held-out
items, which no trial saw. Run from the repository root (the chain's model paths are relative to
it; the demo models are built into ./runs/demo3-models on first use). One process: the parents,
the live model and the lm-eval requests are built once and shared by every study.
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
    parser.add_argument("--study", default="studies/demo-chain.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-trials", type=int, default=60, help="new candidates per arm (the baseline not counted)")
    parser.add_argument("--sampler", help="default: the study's")
    args = parser.parse_args()

    import optuna

    from demos.models import ThreeRecipe, build_demo_models
    from search.runner import Candidates
    from search.samplers import make_sampler
    from search.storage import quiet_optuna
    from search.study_config import DEMO3_MODELS, load_study_file

    torch.set_num_threads(1)
    quiet_optuna()
    build_demo_models(DEMO3_MODELS, recipe=ThreeRecipe())
    study_file = load_study_file(args.study)
    c = Candidates(study_file, "cpu")
    if not hasattr(c.space, "stages"):
        raise SystemExit(f"{args.study}: not a chain study (merge.config needs several stages)")
    sampler_name = args.sampler or study_file.study.sampler
    dists = c.space.distributions()
    labels = [label for label, space in c.space.spaces.items() if space.distributions()]
    baseline = c.space.params_of(c.baseline)

    def score(params: dict, split: str) -> float:
        c.build(c.space.recipe(params))
        return c.suite.evaluate(c.model, split, c.batch_size).score

    def tune(names: list[str], start: dict, start_value: float, n_trials: int, seed: int) -> tuple[dict, float]:
        """Search `names` for n_trials with every other parameter at `start`; the best point and its score."""
        study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler_name, seed))
        space = {n: dists[n] for n in names}
        study.add_trial(optuna.trial.create_trial(params={n: start[n] for n in names}, distributions=space,
                                                  value=start_value))
        for _ in range(n_trials):
            trial = study.ask(space)
            study.tell(trial, score({**start, **trial.params}, "search"))
        return {**start, **study.best_trial.params}, study.best_value

    base_search, base_held = score(baseline, "search"), score(baseline, "holdout")
    print(f"{args.study}: stages {', '.join(labels)}; {len(dists)} parameters; sampler {sampler_name}; "
          f"{args.n_trials} trials per arm; hand-written chain: search {base_search:.4f}, held-out {base_held:.4f}",
          flush=True)
    rows: dict[str, list[tuple[float, float, float]]] = {"joint": [], "staged": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = time.perf_counter()
        best, value = tune(list(dists), baseline, base_search, args.n_trials, seed)
        rows["joint"].append((value, score(best, "holdout"), time.perf_counter() - start))
        start = time.perf_counter()
        best, value = baseline, base_search
        shares = [args.n_trials // len(labels) + (i < args.n_trials % len(labels)) for i in range(len(labels))]
        for label, n in zip(labels, shares, strict=True):
            names = [name for name in dists if name.startswith(f"{label}.")]
            best, value = tune(names, best, value, n, seed)
        rows["staged"].append((value, score(best, "holdout"), time.perf_counter() - start))
        for arm in rows:
            s, h, t = rows[arm][-1]
            print(f"seed {seed} {arm:>6}: best search {s:.4f}, its held-out {h:.4f}, {t:.0f} s", flush=True)

    print(f"\n{args.study}, {args.n_trials} trials per arm, sampler {sampler_name}, seeds {args.seeds}; "
          f"hand-written chain held-out {base_held:.4f}")
    print(f"{'arm':>7} {'mean best search':>17} {'mean held-out':>14} {'median held-out':>16} {'mean s':>7}"
          "  per seed (search / held-out)")
    for arm, runs in rows.items():
        per_seed = ", ".join(f"{s:.3f}/{h:.3f}" for s, h, _ in runs)
        print(f"{arm:>7} {statistics.mean(r[0] for r in runs):>17.4f} {statistics.mean(r[1] for r in runs):>14.4f} "
              f"{statistics.median(r[1] for r in runs):>16.4f} {statistics.mean(r[2] for r in runs):>7.0f}  {per_seed}")


if __name__ == "__main__":
    main()
