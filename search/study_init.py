"""Write a starter study from a hand-written mergekit config: its numbers become the search space.

Every number the config sets (global parameters, and each model's own) becomes a searched item
with the same anchor count and filter, over a range that suits the parameter and always holds
the config's own value, so the config itself is trial 0 (the baseline). Switches (normalize,
int8_mask, rescale, filter_wise) become choices. Slice-level parameters are kept as written.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import yaml

from merge_core import methods
from merge_core.config import MergeConfig, reference_text
from search.config_space import model_aliases

LEADERBOARD_TASKS = [
    {"name": "arc_challenge", "metric": "acc_norm", "num_fewshot": 25},
    {"name": "hellaswag", "metric": "acc_norm", "num_fewshot": 10},
    {"name": "mmlu", "metric": "acc", "num_fewshot": 5},
    {"name": "truthfulqa_mc2", "metric": "acc", "num_fewshot": 0},
    {"name": "winogrande", "metric": "acc", "num_fewshot": 5},
    {"name": "gsm8k", "metric": "exact_match,strict-match", "num_fewshot": 5},
]
# Ranges that suit each parameter; widened to hold the config's own values.
RANGES = {"t": (0.0, 1.0), "weight": (0.0, 1.0), "density": (0.1, 1.0), "lambda": (0.5, 1.5),
          "gamma": (0.0, 0.1), "epsilon": (0.01, 0.25), "scale": (0.0, 2.0), "max_iter": (1, 50),
          "tol": (1e-7, 1e-3), "select_topk": (0.1, 1.0)}
DELLA_DENSITY = (0.3, 0.7)  # with epsilon <= 0.25, density +/- epsilon stays inside (0, 1)
# Thresholds on the size of a delta (nearswap's t, ram's epsilon) span decades: searched on a log
# scale over the sizes fine-tune deltas have (above about 0.1 every element counts as near or moved).
DELTA_THRESHOLDS = {("nearswap", "t"): (1e-5, 0.1), ("ram", "epsilon"): (1e-7, 0.01),
                    ("ramplus_tl", "epsilon"): (1e-7, 0.01)}


def space_items(config: MergeConfig) -> list[dict]:
    """One search_space item per number (and switch) the config sets, in config order."""
    method = methods.get(config.merge_method)
    aliases = model_aliases(config.model_names())
    items: list[dict] = []
    for name, setting in (config.parameters or {}).items():
        items += _items_for(method, name, None, setting)
    for entry in config.models or []:
        for name, setting in (entry.parameters or {}).items():
            items += _items_for(method, name, aliases[entry.model], setting)
    seen = set()
    for sl in config.slices or []:
        for src in sl.sources:
            for name, setting in (src.parameters or {}).items():
                if (name, src.model) not in seen:  # a model's first slice speaks for all its slices
                    seen.add((name, src.model))
                    items += _items_for(method, name, aliases[src.model], setting)
    return items


def _items_for(method, name: str, model: str | None, setting) -> list[dict]:
    param = method.param(name)
    if param is None:
        return []  # the plan reports unknown parameters with a did-you-mean
    filtered = isinstance(setting, list) and setting and not isinstance(setting[0], bool | int | float | str)
    entries = setting if filtered else [setting]
    items = []
    for entry in entries:
        flt, value = (entry.filter, entry.value) if hasattr(entry, "value") else (None, entry)
        item: dict = {"parameter": name}
        if model is not None:
            item["models"] = [model]
        if flt is not None:
            item["filter"] = flt
        values = value if isinstance(value, list) else [value]
        if param.kind is bool or any(isinstance(v, bool | str) for v in values):
            item["choices"] = [True, False]
        else:
            if name == "density" and "della" in method.name:
                low, high = DELLA_DENSITY
            else:
                low, high = DELTA_THRESHOLDS.get((method.name, name), RANGES.get(name, (0.0, 1.0)))
            low, high = min([low, *values]), max([high, *values])
            item |= {"anchors": len(values), "low": float(f"{low:.6g}"), "high": float(f"{high:.6g}")}
            if (name == "tol" or (method.name, name) in DELTA_THRESHOLDS) and low > 0:
                item["log"] = True
        items.append(item)
    return items


def study_text(config: MergeConfig, config_path: Path, out: Path, tasks: list[dict] | None,
               include_path: list[str], name: str | None, n_trials: int) -> str:
    """The commented study YAML for a config file: the file is the baseline, its numbers the space."""
    relative = os.path.relpath(config_path.resolve(), out.resolve().parent)
    header = [f"# Study written by `search init {config_path}` on {date.today()}.",
              f"# Trial 0 (the baseline) is {config_path.name} as written; the search varies the numbers below."]
    return render_study(header, name or _safe_name(config_path.stem), relative, space_items(config),
                        [t | {"search_items": 100, "validation_items": 100, "holdout_items": 300}
                         for t in (tasks or LEADERBOARD_TASKS)],
                        include_path, n_trials, out)


def render_study(header: list[str], name: str, config_ref: str | dict, items: list[dict], tasks: list[dict],
                 include_path: list[str], n_trials: int, out: Path) -> str:
    """A study file with comments a new user can follow."""
    study = {"study": {"name": name, "sampler": "gp", "seed": 0, "n_trials": n_trials},
             "merge": {"config": config_ref, "device": "cpu", "random_seed": 0}}
    sections = [
        *header,
        f"#   search start {out} --dry-run     # validate and print the plan",
        f"#   search start {out} [--device cuda]",
        yaml.safe_dump(study, sort_keys=False, default_flow_style=None, width=120).rstrip(),
        "# One item per searched number: `anchors` searches a gradient of that many values in",
        "# [low, high]; `blocks` one value per block of layers; `choices` a switch. Narrow, widen or",
        "# delete items as you like; the baseline's own values must stay inside the ranges.",
        yaml.safe_dump({"search_space": items or [{"parameter": "CHANGE_ME", "anchors": 1}]},
                       sort_keys=False, default_flow_style=None, width=120).rstrip(),
        "# Starter objectives (lm-eval task names, or tasks in include_path): per task a fast search",
        "# subset, validation items that pick the final merge among the top candidates, and held-out items",
        "# that judge it against the baseline (paired CI and p-value). Replace them with what your merge is for.",
        yaml.safe_dump({"objectives": {"include_path": include_path, "batch_size": 16, "max_length": 2048,
                                       "tasks": tasks}}, sort_keys=False, default_flow_style=None,
                       width=120).rstrip(),
        yaml.safe_dump({"pruner": {"type": "racing", "n_startup_steps": 20},
                        "export": {"top_k": 3}}, sort_keys=False).rstrip(),
    ]
    if not items:
        sections.insert(len(header) + 3, "# The config sets no number its method takes: add search_space items.")
    return "\n".join(sections) + "\n"


def _safe_name(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem) or "study"


# mergekit-evolve's genome: which parameters each method searches (mergekit/evo/genome.py).
EVOLVE_PARAMS = {"linear": ["weight"], "task_arithmetic": ["weight"], "ties": ["weight", "density"],
                 "dare_ties": ["weight", "density"], "slerp": ["t"]}
EVOLVE_NOT_CARRIED = ("limit", "shuffle", "random_init", "apply_chat_template", "fewshot_as_multiturn")


def from_evolve(genome_file: dict, num_layers: int) -> tuple[dict, list[dict], list[dict], list[str]]:
    """A mergekit-evolve configuration as (baseline config, search_space items, tasks, notes on what changed).

    The baseline is the uniform merge (equal weights, density 0.5, t 0.5): mergekit-evolve starts
    from its own initial genome, which its file does not hold.
    """
    genome = genome_file["genome"]
    method = genome["merge_method"]
    models = [reference_text(m) for m in genome["models"]]
    base = reference_text(genome["base_model"]) if genome.get("base_model") else None
    notes: list[str] = []
    granularity = int(genome.get("layer_granularity") or 0)
    groups = num_layers // granularity if granularity > 0 else 1
    # layer_granularity without smooth: one value per block of layers (blocks); smooth: a gradient over them.
    shape = {"blocks": groups} if granularity > 0 and not genome.get("smooth") else {"anchors": groups}
    filters = list(genome.get("filters") or [])
    negative = bool(genome.get("allow_negative_weights"))
    normalize = genome.get("normalize")
    if normalize is None:
        normalize = method in ("ties", "dare_ties", "linear")
    config: dict = {"merge_method": method, "dtype": "bfloat16"}
    if base:
        config["base_model"] = str(base)
    if genome.get("tokenizer_source"):
        config["tokenizer_source"] = genome["tokenizer_source"]
    items: list[dict] = []
    start = {"weight": round(1.0 / len(models), 6), "density": 0.5, "t": 0.5}
    if method == "slerp":
        config["models"] = [{"model": m} for m in models]
        config["parameters"] = {"t": start["t"]}
        items.append({"parameter": "t"} | shape | {"low": 0.0, "high": 1.0})
    else:
        config["parameters"] = {"normalize": normalize} | ({"int8_mask": True} if method != "linear" else {})
        config["models"] = [{"model": m, "parameters": {p: start[p] for p in EVOLVE_PARAMS[method]}} for m in models]
        if base and base not in models:
            config["models"].append({"model": str(base)})
        for param in EVOLVE_PARAMS[method]:
            low = -1.0 if negative and param == "weight" else 0.0
            for flt in [*filters, None]:
                item = {"parameter": param, "models": "all"} | shape | {"low": low, "high": 1.0}
                items.append(item | ({"filter": flt} if flt else {}))
    tasks = []
    for task in genome_file.get("tasks") or []:
        task = {"name": task} if isinstance(task, str) else dict(task)
        metric = str(task.get("metric", "acc,none")).removesuffix(",none")
        entry = {"name": task["name"], "weight": float(task.get("weight", 1.0)), "metric": metric,
                 "search_items": int(genome_file.get("limit") or 100), "validation_items": 100,
                 "holdout_items": 300}
        if genome_file.get("num_fewshot") is not None:
            entry["num_fewshot"] = int(genome_file["num_fewshot"])
        tasks.append(entry)
    if genome_file.get("limit"):
        notes.append(f"limit {genome_file['limit']} became each task's search_items (plus 300 held-out items)")
    dropped = [k for k in EVOLVE_NOT_CARRIED[1:] if k in genome_file]
    if dropped:
        notes.append(f"not carried over: {', '.join(dropped)}")
    return config, items, tasks, notes
