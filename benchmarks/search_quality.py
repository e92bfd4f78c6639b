"""Does the search find merges that are really better? Samplers x seeds x pruner, at equal budget.

    nice .venv/bin/python benchmarks/search_quality.py [--studies demo,bench-slerp2,demo3]
        [--samplers gp,tpe,cmaes,random] [--seeds 0,1,2] [--pruner study|racing,wilcoxon,none]
        [--n-trials N] [--json OUT]

For each study (studies/NAME.yaml) the parents and the suite are built once; then every (sampler,
seed, pruner) runs a fresh study of n_trials in a temporary SQLite file, and its final pick is made
as `search start` makes it (search.selection: the top candidates by search score re-scored on the
validation items when the study has them) and reported on the held-out items, which nothing else
used. Per run it prints:
  gain        final pick minus the hand-written baseline, held-out weighted score
  vs uniform  final pick minus the best uniform setting (a grid over one value for every searched
              number of the first parameter, e.g. t or weight, the others at the baseline; picked on
              validation items if any, else on search items; reported held-out)
  p           the paired test of the pick against the baseline on held-out items (search.stats)
  items/trial search items scored per finished trial, as a fraction of the search set
  gap         the pick's search score minus its held-out score (the winner's curse, plus any
              difference in difficulty between the splits; the baseline's own gap is printed too)
  wall        seconds of the run (trials + selection), on this machine, with one torch thread
The summary gives, per study, sampler and pruner, the median over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # fractions of each number's [low, high]


def uniform_reference(candidates, study_file) -> dict:
    """The best uniform setting of the first searched parameter, and the baseline, on held-out items."""
    import optuna

    space = candidates.space
    dists = space.distributions()
    base_params = space.params_of(candidates.baseline)
    first = next(iter(dists)).split(".")[0]
    grid_names = [n for n in dists if n.split(".")[0] == first and not isinstance(
        dists[n], optuna.distributions.CategoricalDistribution)]
    low = max(dists[n].low for n in grid_names)
    high = min(dists[n].high for n in grid_names)
    pick_split = "validation" if candidates.suite.n_items("validation") else "search"
    scored = []
    for frac in GRID:
        value = low + frac * (high - low)
        recipe = space.recipe({**base_params, **{n: value for n in grid_names}})
        candidates.build(recipe)
        scored.append((candidates.suite.evaluate(candidates.model, pick_split, candidates.batch_size).score, value,
                       recipe))
    best_score, best_value, recipe = max(scored, key=lambda s: s[0])
    candidates.build(recipe)
    held = candidates.suite.evaluate(candidates.model, "holdout", candidates.batch_size).score
    candidates.build(candidates.baseline)
    base_held = candidates.suite.evaluate(candidates.model, "holdout", candidates.batch_size).score
    return {"parameter": first, "value": best_value, "picked_on": pick_split, "holdout": held,
            "baseline_holdout": base_held}


def one_run(study_file, candidates, sampler: str, seed: int, pruner: str, n_trials: int, folder: Path,
            pruner_settings: dict | None = None) -> dict:
    """One study from scratch; its final pick and what it cost."""
    from search import results
    from search.runner import RunOptions, StudyRunner
    from search.selection import finalize
    from search.study_config import PrunerSection

    if pruner != "study" or pruner_settings:
        settings = study_file.pruner.model_dump() | (pruner_settings or {})
        if pruner != "study":
            settings["type"] = pruner
        study_file = study_file.model_copy(update={"pruner": PrunerSection(**settings)})
    name = f"{study_file.study.name}-{sampler}-{seed}-{pruner}"
    options = RunOptions(storage=f"sqlite:///{folder / name}.db", study_name=name, n_trials=n_trials, timeout=None,
                         sampler=sampler, seed=seed, device="cpu", heartbeat=None)
    start = time.perf_counter()
    runner = StudyRunner(study_file, options, candidates)
    study = runner.open_study()
    runner.optimize(study)
    pick = finalize(study, candidates, study_file)
    wall = time.perf_counter() - start
    records = results.records(study)
    finished = [r for r in records if r.items_scored is not None]
    n_search = candidates.suite.n_items("search")
    weighted = next(d for d in pick["comparison"] if d["name"] == "weighted")
    return {"study": study_file.study.name, "sampler": sampler, "seed": seed, "pruner": pruner,
            "n_trials": n_trials, "winner": pick["winner"], "picked_on": pick["picked_on"],
            "baseline_holdout": weighted["baseline"], "pick_holdout": weighted["candidate"],
            "gain": weighted["diff"], "p_value": weighted["p_value"], "significant": weighted["significant"],
            "items_per_trial": statistics.mean(r.items_scored for r in finished) / n_search,
            "gap": pick["gap"], "baseline_gap": pick["baseline_gap"], "wall_s": wall}


def main() -> None:
    import optuna
    import torch

    from search.commands._common import ensure_demo_parents
    from search.commands.demo import demo_study
    from search.runner import Candidates
    from search.study_config import load_study_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", default="demo,bench-slerp2,demo3")
    parser.add_argument("--samplers", default="gp,tpe,cmaes,random")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pruner", default="study",
                        help="study (the study file's), racing, wilcoxon, none, or a list: racing,wilcoxon,none")
    parser.add_argument("--n-trials", type=int, help="default: each study's n_trials")
    parser.add_argument("--p-threshold", type=float, help="override pruner.p_threshold")
    parser.add_argument("--n-startup-steps", type=int, help="override pruner.n_startup_steps")
    parser.add_argument("--against", choices=("top_k", "best"), help="override pruner.against (racing)")
    parser.add_argument("--pruned-trials", choices=("estimate", "hidden"), help="override pruner.pruned_trials")
    parser.add_argument("--margin", type=float, help="override pruner.margin (racing)")
    parser.add_argument("--boundary", choices=("per_look", "anytime"), help="override pruner.boundary (racing)")
    parser.add_argument("--json", help="also write every run as JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs: list[dict] = []
    out = open(args.json, "a") if args.json else None  # noqa: SIM115 - appended as runs finish
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.studies.split(","):
            path = Path(name) if Path(name).is_file() else REPO / "studies" / f"{name}.yaml"
            if not path.is_file():
                path = demo_study(name)
            study_file = load_study_file(str(path))
            ensure_demo_parents(study_file)
            candidates = Candidates(study_file, "cpu")
            ref = uniform_reference(candidates, study_file)
            print(f"\n## {name}: baseline held-out {ref['baseline_holdout']:.4f}; best uniform {ref['parameter']} = "
                  f"{ref['value']:.3f} (picked on {ref['picked_on']}) held-out {ref['holdout']:.4f}", flush=True)
            print("| sampler | seed | pruner | pick held-out | gain | vs uniform | p | items/trial | gap | "
                  "baseline gap | wall s |")
            print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
            for sampler in args.samplers.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    for pruner in args.pruner.split(","):
                        overrides = {k: v for k, v in (("p_threshold", args.p_threshold),
                                                       ("n_startup_steps", args.n_startup_steps),
                                                       ("against", args.against),
                                                       ("pruned_trials", args.pruned_trials),
                                                       ("boundary", args.boundary),
                                                       ("margin", args.margin)) if v is not None}
                        run = one_run(study_file, candidates, sampler, seed, pruner,
                                      args.n_trials or study_file.study.n_trials, Path(tmp), overrides)
                        run["vs_uniform"] = run["pick_holdout"] - ref["holdout"]
                        run["uniform"] = ref
                        runs.append(run)
                        if out:
                            out.write(json.dumps(run) + "\n")
                            out.flush()
                        print(f"| {sampler} | {seed} | {pruner} | {run['pick_holdout']:.4f} | {run['gain']:+.4f} | "
                              f"{run['vs_uniform']:+.4f} | {run['p_value']:.3g} | {run['items_per_trial']:.0%} | "
                              f"{run['gap']:+.4f} | {run['baseline_gap']:+.4f} | {run['wall_s']:.0f} |", flush=True)
    print("\n## median over seeds")
    print("| study | sampler | pruner | runs | median gain | median vs uniform | median items/trial | "
          "median gap | significant | median wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    keys = dict.fromkeys((r["study"], r["sampler"], r["pruner"]) for r in runs)
    for study, sampler, pruner in keys:
        rs = [r for r in runs if (r["study"], r["sampler"], r["pruner"]) == (study, sampler, pruner)]

        def med(key, rs=rs):
            return statistics.median(r[key] for r in rs)

        print(f"| {study} | {sampler} | {pruner} | {len(rs)} | {med('gain'):+.4f} | {med('vs_uniform'):+.4f} | "
              f"{med('items_per_trial'):.0%} | {med('gap'):+.4f} | {sum(r['significant'] for r in rs)}/{len(rs)} | "
              f"{med('wall_s'):.0f} |")


if __name__ == "__main__":
    main()
