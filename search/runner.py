"""The trial loop: parents' geometry once per study, then build -> score -> prune per trial."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from merge_core.errors import DegeneratePoint, MergeInputError
from search import results
from search.errors import StudyError
from search.interrupts import SignalGuard
from search.pruners import Race, optuna_pruner
from search.samplers import make_sampler
from search.space import Recipe, SearchSpace, baseline_recipe, space_of
from search.storage import open_storage
from search.study_config import StudyFile
from search.trial_record import (
    BASELINE_RECIPE,
    LORA_MERGE_DTYPE,
    PARENTS,
    TASK_NAMES,
    HeldOut,
    TrialRecord,
    write,
    write_holdout,
    write_validation,
)
from search.workers import (
    BUDGET,
    INTERRUPTED,
    SLOT,
    SURPLUS,
    Heartbeat,
    Owner,
    claim_next,
    fail,
    reclaim,
    refill,
    retry,
    surplus,
)

TrialState = optuna.trial.TrialState
# Fault injection for the reliability tests: "<point>:<trial number>:<SIGNAL>" makes this process send
# itself SIGNAL at that point of that trial (points: start, merge, scoring; see tests/search/test_reliability.py).
FAULT_ENV = "MERGE_SEARCH_FAULT"
# A worker whose trials fail this many times in a row for the same reason stops and says why.
REPEATED_FAILURES = 3


class CandidateFailed(RuntimeError):
    """A candidate that cannot be scored (NaN/Inf outputs); its trial ends as FAIL."""


class BudgetReached(RuntimeError):
    """A trial started after the budget was used up; it ends as FAIL and the worker stops."""


def parent_fingerprints(refs: list[str], allow_pickle: bool) -> list[dict]:
    """[{"model": ref, "files": fingerprint}] of every model a merge reads, in the config's order."""
    from merge_core.fingerprint import fingerprint
    from merge_core.refs import resolve

    return [{"model": ref, "files": fingerprint(resolve(ref, allow_pickle))} for ref in refs]


def fault_point(point: str, trial_number: int) -> None:
    """Send this process the signal MERGE_SEARCH_FAULT names for this point of this trial (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, number, name = spec.split(":")
    if where == point and int(number) == trial_number:
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(1)  # a handled signal raises here; SIGKILL never returns


def wait_for_budget(study: optuna.Study, patience: float = 60.0) -> int:
    """The budget a study's creator recorded; its set-up marker, so joining workers wait for it."""
    deadline = time.monotonic() + patience
    while (budget := study.user_attrs.get(BUDGET)) is None:
        if time.monotonic() > deadline:
            raise StudyError(f"study {study.study_name!r} was never fully set up (its creator died?); "
                             "use another study name")
        time.sleep(0.2)
    return budget


def waiting(study: optuna.Study) -> list:
    """Trial slots not yet taken by any worker."""
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


@dataclass
class RunOptions:
    """Command-line overrides of a study file."""

    storage: str
    study_name: str
    n_trials: int
    timeout: float | None
    sampler: str
    seed: int
    device: str
    heartbeat: int | None = 30
    allow_changed_parents: bool = False


class StudyPlan:
    """A study's space, baseline and merge plan (a chain's final stage for chains), checked as far as
    it can be without loading weights: the baseline is a point of the space, and the method takes the
    middle and the ends of every range."""

    def __init__(self, study: StudyFile, device: str = "cpu"):
        from merge_core.merger import MergePlan
        from merge_core.vocabulary import trust_remote_code

        if study.merge.trust_remote_code:
            trust_remote_code()  # tokenizers, the live model's classes, in this process and its workers
        self.space = space_of(study)
        self.baseline = baseline_recipe(study)
        self.space.params_of(self.baseline)  # the baseline must be a point of the space
        self.chain = None
        if hasattr(self.space, "stages"):  # a multi-stage study: every stage in memory, per candidate
            from merge_core.chain import ChainPlan

            self.chain = ChainPlan(self.space.config_of(self.baseline), study.merge.allow_pickle, device,
                                   study.merge.random_seed)
            self.plan = self.chain.final
        else:
            self.plan = MergePlan(self.space.config_of(self.baseline), allow_pickle=study.merge.allow_pickle)
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Every tensor gets a value (a probe at the middle of every range), and the method takes the
        ends of each range (each end with the others in the middle, then all lows, then all highs): a
        range a trial would leave as an invalid merge is refused now, before any storage exists."""
        distributions = self.space.distributions()
        middle = {n: _middle(d) for n, d in distributions.items()}
        try:
            self._values_of(middle)
        except DegeneratePoint:
            pass  # one point of the ranges (weights summing to 0 there): a trial that lands on it fails alone
        except Exception as exc:
            raise StudyError(f"search_space: {exc}; add a `default` entry") from None
        ends = {n: d for n, d in distributions.items()
                if not isinstance(d, optuna.distributions.CategoricalDistribution)}
        probes = []
        for name, dist in ends.items():
            probes += [(f"{name} = {dist.low:g} (the low end of its range)", {**middle, name: dist.low}),
                       (f"{name} = {dist.high:g} (the high end of its range)", {**middle, name: dist.high})]
        if len(ends) > 1:
            probes += [("every range at its low end", {**middle, **{n: d.low for n, d in ends.items()}}),
                       ("every range at its high end", {**middle, **{n: d.high for n, d in ends.items()}})]
        for where, params in probes:
            try:
                self._values_of(params)
            except DegeneratePoint:
                continue
            except Exception as exc:
                raise StudyError(f"search_space: at {where}: {exc}; narrow the range") from None

    def _values_of(self, params: dict) -> None:
        config = self.space.config_of(self.space.recipe(params))
        if self.chain is not None:
            self.chain.use(config)
        else:
            self.plan.values(config)


def parents_on_disk(names: list[str]) -> bool:
    """Whether every model named is a folder here (nothing to download or build); a path to no
    folder (not a Hub id, not a demo model built on first use) is refused in one line."""
    from merge_core.refs import ModelRef, is_hub_id, split_adapter
    from search.study_config import DEMO3_MODELS, DEMO_MODELS

    on_disk = True
    parts = [part for name in names for part in split_adapter(str(name)) if part is not None]
    for name in parts:
        folder = Path(ModelRef.parse(str(name)).name).expanduser()
        if folder.is_dir():
            continue
        on_disk = False
        demo = folder.resolve().parent in (DEMO_MODELS.resolve(), DEMO3_MODELS.resolve())
        if not is_hub_id(str(folder)) and not demo:
            raise StudyError(f"model {name}: no such folder (and not a Hub id of the form org/name)")
    return on_disk


class Candidates:
    """Everything built once per study: the merger with the parents' geometry, a live model, the suite."""

    def __init__(self, study: StudyFile, device: str, progress: Callable[[str, int, int], None] | None = None):

        from merge_core.merger import Merger
        from merge_core.vocabulary import load_tokenizer
        from objectives import Suite, TaskSpec

        self.study = study
        self.device = device
        checked = StudyPlan(study, device)
        self.space: SearchSpace = checked.space
        self.baseline: Recipe = checked.baseline
        self.chain, self.plan = checked.chain, checked.plan
        # the tokenizer the merged model is written with: tokenizer_source's (loaded and checked by the plan)
        tokenizer = self.plan.tokenizer or getattr(self.plan.base, "tokenizer", None)  # or an earlier stage's
        if tokenizer is None:
            tokenizer = load_tokenizer(self.plan.base.folder)
        specs = [TaskSpec(**t.model_dump()) for t in study.objectives.tasks]
        include = [str(Path(p)) for p in study.objectives.include_path]
        self.suite = Suite.build(specs, tokenizer, include, max_length=study.objectives.max_length)
        on_tensor = (lambda done, total: progress("geometry", done, total)) if progress else None
        if self.chain is not None:
            from merge_core.chain import ChainMerger

            self.merger = ChainMerger(self.chain)
        else:
            self.merger = Merger(self.plan, device, progress=on_tensor, seed=study.merge.random_seed)
        self.model = self.merger.new_model()
        parents = self.space.parents() if hasattr(self.space, "parents") else self.plan.config.model_names()
        self.parents = parent_fingerprints(parents, study.merge.allow_pickle)
        self.batch_size = study.objectives.batch_size

    def build(self, recipe: Recipe) -> float:
        """Write the candidate into the live model; returns seconds taken."""
        start = time.perf_counter()
        self.merger.build_into(self.model, self.space.config_of(recipe))
        return time.perf_counter() - start

    def mergekit_yaml(self, recipe: Recipe) -> str:
        """The exact mergekit YAML of a candidate (with the seed its random masks need, if any)."""
        from merge_core.refs import mergekit_lora_flags

        plans = self.chain.plans if self.chain is not None else [self.plan]
        if self.chain is not None:
            text = self.space.yaml_of(recipe)
            tool = "mergekit-multi THIS.yml --out-path OUT -I INTERMEDIATE_DIR"
        else:
            text = self.space.config_of(recipe).to_yaml()
            tool = "mergekit-yaml THIS.yml OUT"
        randomised = [p.method.name for p in plans if p.method.randomised]
        dtype = lora_merge_dtype()
        lora = mergekit_lora_flags([m for p in plans for m in p.models], dtype)
        ours = f" --lora-merge-dtype {dtype}" if lora and dtype else ""
        if randomised:
            seed = self.study.merge.random_seed
            text = (f"# {', '.join(randomised)} draws random masks: build it with --random-seed {seed}\n"
                    f"#   {tool} --random-seed {seed}{lora}   (or: search merge THIS.yml OUT "
                    f"--random-seed {seed}{ours})\n") + text
        elif lora:
            text = (f"# a parent carries a LoRA adapter, which mergekit applies into a cache folder:\n"
                    f"#   {tool}{lora}   (or: search merge THIS.yml OUT{ours})\n") + text
        return text


def lora_merge_dtype() -> str | None:
    """The dtype this process applies LoRA adapters in ($MERGE_SEARCH_LORA_DTYPE), None for the model's own."""
    from merge_core.lora import DTYPE_ENV

    return os.environ.get(DTYPE_ENV) or None


def _middle(dist):
    """A point inside a distribution (the probe that checks every tensor gets a value)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices[0]
    if isinstance(dist, optuna.distributions.IntDistribution):
        return (dist.low + dist.high) // 2
    return (dist.low + dist.high) / 2


class StudyRunner:
    """Runs (or resumes) one Optuna study of a study file."""

    def __init__(self, study: StudyFile, options: RunOptions, candidates: Candidates, notes=None,
                 guard: SignalGuard | None = None):
        self.study_file = study
        self.notes = notes  # search.notes.StudyNotes: trial YAML artifacts, dashboard note and figures
        self.options = options
        self.c = candidates
        self.multi = study.study.per_task(options.sampler)
        self.pruning = study.pruner.type != "none" and not self.multi
        self.task_names = [t.name for t in study.objectives.tasks]
        self.guard = guard or SignalGuard()
        self.me = Owner.me(options.heartbeat or 30)
        self.poll_seconds = min(5.0, self.me.interval / 3)
        self.on_create = None  # called with a study this worker just created, before its slots exist
        self._current: int | None = None  # number of the trial this process runs

    def open_study(self) -> optuna.Study:
        """Create or load the study; its creator enqueues the baseline and the budget's trial slots."""
        storage = open_storage(self.options.storage)
        directions = ["maximize"] * (len(self.task_names) if self.multi else 1)
        with self.guard.deferred():  # a Ctrl-C here would leave a study without its budget
            try:
                study = optuna.create_study(study_name=self.options.study_name, storage=storage,
                                            directions=directions)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=self.options.study_name, storage=storage)
                created = False
            if len(study.directions) != len(directions):
                raise StudyError(f"study {self.options.study_name!r} has {len(study.directions)} objective(s); "
                                 f"sampler {self.options.sampler} needs {len(directions)}; use another --study-name")
            if not created:
                self._check_parents(study)
            if created:
                study.set_user_attr(PARENTS, self.c.parents)
                study.set_user_attr(LORA_MERGE_DTYPE, lora_merge_dtype())
                study.set_metric_names(self.task_names if self.multi else ["weighted score"])
                study.set_user_attr(BASELINE_RECIPE, self.c.baseline)
                study.set_user_attr(TASK_NAMES, self.task_names)
                if self.on_create is not None:
                    self.on_create(study)
                refill(study, self.options.n_trials, self._baseline_params(), self.options.n_trials)
                study.set_user_attr(BUDGET, self.options.n_trials)
        # The creator uses the study's seed (a single worker is reproducible); a worker that joins or
        # resumes mixes in its pid, so that workers started together do not draw the same parameters.
        seed = self.options.seed if created else self.options.seed + len(study.trials) + 7919 * os.getpid()
        study.sampler = make_sampler(self.options.sampler, seed % 2**32)
        study.pruner = self._pruner()
        if not created:
            budget = wait_for_budget(study)
            if self.options.n_trials > budget:  # a bigger --n-trials on resume: the refill adds the difference
                study.set_user_attr(BUDGET, self.options.n_trials)
        return study

    def _check_parents(self, study: optuna.Study) -> None:
        """Refuse to resume or join with parents other than the ones the study's scores came from."""
        from merge_core.fingerprint import changed_files

        recorded = study.user_attrs.get(PARENTS)
        if recorded is None:  # a study from before fingerprints: they start now
            study.set_user_attr(PARENTS, self.c.parents)
            return
        for old, new in zip(recorded, self.c.parents, strict=False):
            changed = changed_files(old["files"], new["files"])
            if not changed:
                continue
            if not self.options.allow_changed_parents:
                raise StudyError(
                    f"parent {new['model']} is not the one study {study.study_name!r} was scored with "
                    f"({', '.join(changed[:3])} changed); restore it, use another --study-name, or pass "
                    "--allow-changed-parents to mix both in one study")
            study.set_user_attr(PARENTS, self.c.parents)
            study.set_user_attr(f"parents_changed_before_trial.{len(study.trials)}", new["model"])

    def _baseline_params(self) -> dict:
        return self.c.space.params_of(self.c.baseline)

    def _pruner(self) -> optuna.pruners.BasePruner:
        cfg = self.study_file.pruner
        return optuna_pruner(cfg.type if self.pruning else "none", cfg.p_threshold, cfg.n_startup_steps)

    def optimize(self, study: optuna.Study, callbacks: list | None = None,
                 on_wait: Callable[[int], None] | None = None) -> None:
        """Run trial slots until exactly n_trials are finished across all workers, or the timeout.

        Between trials the worker fails orphaned trials (their worker died) and retries them, and
        tops the slots up to the budget; with no slot left it waits for the other workers' RUNNING
        trials to finish or be orphaned, so a slot that comes back is never left behind.
        """
        deadline = None if self.options.timeout is None else time.monotonic() + self.options.timeout
        repeats: list[str] = []
        while deadline is None or time.monotonic() < deadline:
            budget = study.user_attrs.get(BUDGET, self.options.n_trials)
            with self.guard.deferred():
                reclaim(study, self.me)
                refill(study, budget, self._baseline_params(), budget)
            if not waiting(study):
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if not running:
                    return
                if on_wait is not None:
                    on_wait(len(running))
                time.sleep(self.poll_seconds)
                continue
            self._current = None
            try:
                # Optuna writes a trial's start and its result to storage around the objective; a
                # signal there would cut a storage write in half, so it waits for the write and the
                # callbacks (the objective itself is interruptible: `immediate` below).
                with self.guard.deferred():
                    claim_next(study, self.me)
                    study.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=callbacks,
                                   gc_after_trial=False)
            except KeyboardInterrupt:
                with self.guard.deferred():
                    self._give_back(study)
                raise
            self._check_repeats(study, repeats)

    def _give_back(self, study: optuna.Study) -> None:
        """After a Ctrl-C/SIGTERM: this process's trial ends FAIL "interrupted" and its slot comes back."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.me.same_process(Owner.of(trial)) or trial.number == self._current:
                fail(study, trial, INTERRUPTED)
        if self._current is not None:
            trial = study.get_trials(deepcopy=False)[self._current]
            if trial.state == TrialState.FAIL and TrialRecord.of(trial).fail_reason == INTERRUPTED \
                    and trial.user_attrs.get(SLOT):
                retry(study, trial)

    def _check_repeats(self, study: optuna.Study, repeats: list[str]) -> None:
        """Stop a worker whose trials keep failing for the same reason, saying what to change."""
        import gc

        if self._current is None:
            return
        trial = study.get_trials(deepcopy=False)[self._current]
        reason = str(TrialRecord.of(trial).fail_reason or "")
        if trial.state != TrialState.FAIL or reason.startswith((SURPLUS, "n_trials reached")):
            repeats.clear()
            return
        gc.collect()  # what a failed trial held (activations of an out-of-memory batch) goes before the next
        if self.c.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        kind = reason.split(":")[0]
        repeats[:] = [r for r in repeats if r == kind] + [kind]
        if len(repeats) >= REPEATED_FAILURES:
            raise StudyError(f"{len(repeats)} trials in a row failed ({reason[:200]}); {_advice(reason)}, "
                             "then run the same command again")

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        """Build the candidate, score it item by item, prune, and record everything on the trial."""
        self._current = trial.number
        fault_point("start", trial.number)  # before the trial's first heartbeat: only the claim names its owner
        with Heartbeat(trial.study, trial._trial_id, self.me):
            try:
                with self.guard.immediate():
                    return self._objective(trial)
            except optuna.TrialPruned:
                raise
            except MergeInputError as exc:
                # a sampled point the method refuses where the ranges combine (della's density - epsilon
                # below 0 at a low density and a high epsilon): this trial fails in one line, the study goes on
                write(trial, fail_reason=f"invalid point: {str(exc)[:500]}")
                optuna.logging.get_logger("optuna").warning(
                    f"Trial {trial.number} is not a valid merge: {exc}; it fails and the study goes on")
                return [math.nan] * len(trial.study.directions) if len(trial.study.directions) > 1 else math.nan
            except BudgetReached as exc:
                write(trial, fail_reason=str(exc))
                raise
            except KeyboardInterrupt:
                write(trial, fail_reason=INTERRUPTED)
                raise
            except BaseException as exc:
                # Its slot comes back through the refill, with fresh parameters (a NaN candidate would
                # fail again), unless failures run away.
                write(trial, fail_reason=f"{type(exc).__name__}: {str(exc)[:500]}")
                raise

    def _objective(self, trial: optuna.Trial) -> float | list[float]:
        if not trial.user_attrs.get(SLOT):
            # Another worker popped the last slot between our check and our ask: not part of the budget.
            raise BudgetReached("n_trials reached: another worker took the last trial slot")
        if surplus(trial.study, trial.number, trial.study.user_attrs.get(BUDGET, self.options.n_trials)):
            # Two workers refilled the same lost slot at once: the budget needs only one of them.
            raise BudgetReached(f"{SURPLUS}: the other trials already make up n_trials")
        record = TrialRecord.of(trial)
        if record.fail_reason:  # a retry carries the failed trial's attributes
            write(trial, fail_reason=None)
        is_baseline = record.baseline
        recipe = self.c.space.suggest(trial)
        if is_baseline:
            recipe = self.c.baseline
        write(trial, recipe=recipe)
        yaml_text = self.c.mergekit_yaml(recipe)
        write(trial, mergekit_yaml=yaml_text)
        if self.notes is not None:  # an artifact can only be attached while the trial runs
            self.notes.attach_yaml(trial, yaml_text)
        fault_point("merge", trial.number)
        write(trial, merge_seconds=round(self.c.build(recipe), 4))

        start = time.perf_counter()
        cfg = self.study_file.pruner
        race, incumbent = None, None
        if self.pruning and cfg.type == "racing" and not is_baseline:
            race, incumbent = self._race(trial.study)
        theirs = incumbent.item_values if incumbent is not None else []
        run = self.c.suite.run(self.c.model, "search", self.c.batch_size)
        values: list[float] = []  # in the suite's item order: step i is values[i]
        pruned = False
        for item in run:
            if not math.isfinite(item.value):
                raise CandidateFailed(f"non-finite score on {item.task} item {item.step}: NaN/Inf in the merge")
            values.append(item.value)
            if len(values) == 1:
                fault_point("scoring", trial.number)
            if not self.pruning:
                continue
            if cfg.type == "wilcoxon":  # Optuna's pruner reads the values back from storage, one write each
                trial.report(item.value, item.step)
            if race is not None and item.step < len(theirs):
                race.add(item.value - theirs[item.step])
            if is_baseline or len(values) % cfg.check_every:
                continue
            if race.lost() if race is not None else cfg.type == "wilcoxon" and trial.should_prune():
                pruned = True
                break
        result = run.result()
        write(trial, scoring_seconds=round(time.perf_counter() - start, 4), items_scored=len(values), pruned=pruned,
              metrics=result.metrics, task_scores=result.task_scores, score=result.score, item_values=values)
        if not math.isfinite(result.score):
            raise CandidateFailed("non-finite suite score: NaN/Inf in the merge")
        if pruned:
            # A pruned trial finishes COMPLETE (Optuna's advice for WilcoxonPruner). Its running mean would
            # mislead the sampler (it depends on which items came first), so the sampler is told a paired
            # estimate: the reference's full score plus the mean difference on the items both scored.
            estimate = paired_estimate(incumbent if race is not None else results.best_trial(trial.study), values)
            write(trial, estimate=estimate)
            if cfg.pruned_trials == "hidden":  # the sampler sees no value at all (Optuna's PRUNED state)
                raise optuna.TrialPruned(f"pruned after {len(values)} items")
            return estimate
        if is_baseline or result.score > results.best_score(trial.study):
            self._score_new_best(trial)
        if self.multi:
            return [result.task_scores[name] for name in self.task_names]
        return result.score

    def _race(self, study: optuna.Study) -> tuple[Race | None, TrialRecord | None]:
        """The race of a trial against the best (or the k-th best, k = selection.top_k), read once when it starts."""
        cfg = self.study_file.pruner
        k = self.study_file.selection.top_k if cfg.against == "top_k" else 1
        top = results.ranked(study)
        if len(top) < k or not top[k - 1].item_values:
            return None, None
        race = Race(self.c.suite.n_items("search"), cfg.p_threshold, cfg.n_startup_steps,
                    anytime=cfg.boundary == "anytime", margin=cfg.margin,
                    item_scale=self.c.suite.item_scale("search"))
        return race, top[k - 1]

    def _score_new_best(self, trial: optuna.Trial) -> None:
        """The baseline and each new best: validation scores if the study has them, else held-out scores.

        With a validation split the held-out items are kept for the final pick and the baseline alone
        (search.selection), so nothing else ever looks at them.
        """
        if self.c.suite.n_items("validation"):
            result = self.c.suite.evaluate(self.c.model, "validation", self.c.batch_size)
            write_validation(trial.study, trial.number, result.score, result.task_scores)
            return
        if self.c.suite.n_items("holdout") == 0:
            return
        start = time.perf_counter()
        held = self.c.suite.evaluate(self.c.model, "holdout", self.c.batch_size)
        write_holdout(trial, HeldOut(held.score, held.task_scores, held.metrics,
                                     round(time.perf_counter() - start, 4), held.items.as_dict()))

    def finalize(self, study: optuna.Study) -> dict | None:
        """The final pick and its paired comparison with the baseline on held-out items (search.selection)."""
        from search.selection import finalize

        return finalize(study, self.c, self.study_file)


def paired_estimate(reference: TrialRecord | None, mine: list[float]) -> float:
    """A partly scored trial's full search score: a fully scored reference's score + mean(mine - its values)."""
    theirs = reference.item_values if reference is not None else None
    n = min(len(mine), len(theirs or []))
    if n == 0:
        return sum(mine) / len(mine)
    return reference.score + sum(a - b for a, b in zip(mine[:n], theirs[:n], strict=True)) / n


def _advice(reason: str) -> str:
    lowered = reason.lower()
    if "out of memory" in lowered or "outofmemory" in lowered:
        return "lower objectives.batch_size (or max_length), or use a device with more memory"
    if "nan" in lowered or "inf" in lowered:
        return ("check the parents' weights for NaN/Inf, try merge.dtype bfloat16 or float32 if it is float16, "
                "or narrow search_space")
    return "fix the cause above"
