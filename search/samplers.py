"""Seeded Optuna samplers by name: a registry, so adding one is one entry."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from search.errors import StudyError

SamplerFactory = Callable[[int | None, int], optuna.samplers.BaseSampler]

SAMPLERS: dict[str, SamplerFactory] = {
    "tpe": lambda seed, startup: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup),
    "cmaes": lambda seed, startup: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1,
                                                                warn_independent_sampling=False),
    "nsga2": lambda seed, startup: optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup)),
    "gp": lambda seed, startup: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
    "random": lambda seed, startup: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(name: str, seed: int | None, n_startup_trials: int = 8) -> optuna.samplers.BaseSampler:
    """The sampler registered as `name`, seeded."""
    if name not in SAMPLERS:
        raise StudyError(f"--sampler {name!r}: unknown sampler (use {', '.join(SAMPLERS)})")
    return SAMPLERS[name](seed, n_startup_trials)
