"""`search init CONFIG.yml`: a starter study whose baseline is a hand-written mergekit config."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.commands._common import positive_int
from search.errors import StudyError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `init` sub-command."""
    parser = sub.add_parser("init", help="write a study that searches the numbers of a mergekit config")
    parser.add_argument("config", nargs="?", help="your mergekit YAML (any supported merge_method)")
    parser.add_argument("--from-evolve", metavar="GENOME.yml", help="convert a mergekit-evolve configuration instead")
    parser.add_argument("--out", help="study file to write (default: <config>.study.yaml next to it)")
    parser.add_argument("--tasks", help="comma-separated lm-eval task names (default: the six leaderboard v1 tasks)")
    parser.add_argument("--include-path", action="append", default=[], help="folder of lm-eval task YAMLs")
    parser.add_argument("--name", help="study name (default: the config's file name)")
    parser.add_argument("--n-trials", type=positive_int, default=100, help="trial budget (default 100)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing study file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config against its method, then write the commented study."""
    from rich.console import Console

    from merge_core.config import load_config
    from search.study_init import study_text

    if (args.config is None) == (args.from_evolve is None):
        raise StudyError("give a mergekit CONFIG.yml, or --from-evolve GENOME.yml (not both)")
    source = Path(args.config or args.from_evolve)
    out = Path(args.out) if args.out else source.with_suffix(".study.yaml")
    if out.exists() and not args.force:
        raise StudyError(f"{out} exists; choose another --out or pass --force")
    tasks = None
    if args.tasks:
        tasks = [{"name": name.strip()} for name in args.tasks.split(",") if name.strip()]
        if not tasks:
            raise StudyError("--tasks: give at least one task name")
    if args.from_evolve:
        text, notes = _from_evolve(source, out, tasks, args)
    else:
        config = load_config(source)
        _check_config(config, source)
        text, notes = study_text(config, source, out, tasks, args.include_path, args.name, args.n_trials), []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as exc:
        raise StudyError(f"{out}: cannot write ({exc.strerror or exc})") from None
    console = Console()
    if notes:
        console.print("changed from mergekit-evolve: " + "; ".join(notes), soft_wrap=True)
    console.print(f"wrote {out}; check it with: search start {out} --dry-run", soft_wrap=True)
    return 0


def _from_evolve(source: Path, out: Path, tasks, args) -> tuple[str, list[str]]:
    from datetime import date

    from merge_core.config import parse_config, read_yaml, reference_text
    from merge_core.layers import layer_count
    from merge_core.refs import config_folder
    from merge_core.weights import read_config
    from search.study_init import from_evolve, render_study

    data = read_yaml(source)
    if not isinstance(data, dict) or not isinstance(data.get("genome"), dict) or not data["genome"].get("models"):
        raise StudyError(f"{source}: not a mergekit-evolve configuration (needs genome.models and merge_method)")
    genome = data["genome"]
    method = genome.get("merge_method")
    from search.study_init import EVOLVE_PARAMS

    if method not in EVOLVE_PARAMS:
        raise StudyError(f"{source}: genome.merge_method {method!r}: mergekit-evolve knows {', '.join(EVOLVE_PARAMS)}")
    first = reference_text(genome.get("base_model") or genome["models"][0])
    layers = layer_count(read_config(config_folder(first))) or 1
    config, items, evolve_tasks, notes = from_evolve(data, layers)
    parse_config(config, f"{source} (as a mergekit config)")  # fails here, not at start
    header = [f"# Study converted by `search init --from-evolve {source}` on {date.today()}.",
              "# The baseline (trial 0) is the uniform merge of the genome's models; the space is the genome's."]
    name = args.name or "".join(c if c.isalnum() or c in "_.-" else "-" for c in source.stem)
    text = render_study(header + [f"# Changed: {n}." for n in notes], name, config, items,
                        tasks or evolve_tasks or [{"name": "CHANGE_ME"}], args.include_path, args.n_trials, out)
    return text, notes


def _check_config(config, source: Path) -> None:
    """Refuse now what `search start` would: a config mergekit cannot merge (parameters, contract, models
    on disk), or one with nothing to search (slice-level parameters are kept as written, not searched).
    Models named by Hub id are checked by `search start`, which may download them."""
    from merge_core.methods import get as get_method
    from merge_core.plan import MergePlan
    from search.runner import parents_on_disk
    from search.study_init import space_items

    method = get_method(config.merge_method)
    if not space_items(config):
        if not method.params:
            raise StudyError(f"{source}: {method.name} has no parameters, so there is nothing to search")
        sliced = next((i for i, sl in enumerate(config.slices or []) if sl.parameters), None)
        if sliced is not None:
            raise StudyError(f"{source}: its numbers are in slices.{sliced}.parameters, which a study keeps as "
                             "written (it searches top-level and per-model parameters): move the ones to search "
                             "to the top-level parameters (a gradient or filter list can give each layer range "
                             "its value)")
        raise StudyError(f"{source}: sets no number {method.name} takes ({', '.join(p.name for p in method.params)}), "
                         "so there is nothing to search; write the values to start from into the config")
    if parents_on_disk(config.model_names()):
        plan = MergePlan(config)
        plan.values(plan.candidate(None))
