"""Seeded Optuna samplers by name."""

from __future__ import annotations

import optuna

from search.errors import StudyError


def make_sampler(name: str, seed: int | None, n_startup_trials: int = 8) -> optuna.samplers.BaseSampler:
    """tpe, cmaes, nsga2 (multi-objective), gp or random, all seeded."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=n_startup_trials)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup_trials))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"--sampler {name!r}: unknown sampler (use tpe, cmaes, nsga2, gp or random)")
