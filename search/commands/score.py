"""`search score`: score one model on lm-eval tasks with the fast in-memory engine."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "float16", "bfloat16")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `score` sub-command."""
    parser = sub.add_parser(
        "score",
        help="score a model on lm-eval tasks (same metrics as lm-eval's HF backend)",
        description="Score a model on lm-eval tasks: lm-eval's prompts and metrics, a faster LM engine.",
    )
    parser.add_argument("--model", required=True, help="model folder, or Hub id in the local cache")
    parser.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_challenge,gsm8k"
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of lm-eval task YAML files (repeatable)",
    )
    parser.add_argument(
        "--limit", type=int, help="score only the first N items of each task (lm-eval's --limit)"
    )
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the model's)"
    )
    parser.add_argument("--max-length", type=int, help="context length (default: the model's, as lm-eval)")
    parser.add_argument("--json", action="store_true", help='print {"results": {task: {metric: value}}} only')
    parser.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check inputs, build the tasks' requests, load the model, score with a progress bar."""
    from objectives.errors import TaskInputError

    for flag, value, low in (
        ("--limit", args.limit, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-fewshot", args.num_fewshot, 0),
        ("--max-length", args.max_length, 2),
    ):
        if value is not None and value < low:
            raise TaskInputError(f"{flag} must be at least {low}, got {value}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise TaskInputError("--tasks names no task; give comma-separated lm-eval task names")

    import json
    import sys

    from rich.console import Console
    from rich.table import Table

    from objectives import Suite, TaskSpec
    from objectives.loading import (
        check_model_dir,
        load_model,
        load_tokenizer,
        max_length_of,
        resolve_model_dir,
    )
    from search.devices import check_device
    from search.progress import console, progress_bar

    folder = resolve_model_dir(args.model)
    check_model_dir(folder, allow_pickle=args.allow_pickle)
    import torch
    from transformers.utils import logging as hf_logging

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf_logging.disable_progress_bar()  # the CLI shows its own bars
    tokenizer, config = load_tokenizer(folder, args.trust_remote_code)
    specs = [
        TaskSpec(name, num_fewshot=args.num_fewshot, search_items=args.limit, subset="first")
        for name in names
    ]
    with console.status("building lm-eval requests"):
        suite = Suite.build(
            specs,
            tokenizer,
            include_paths=args.include_path,
            max_length=args.max_length or max_length_of(config, tokenizer),
        )
    with console.status(f"loading {folder.name} on {device}"):
        model = load_model(folder, device, args.dtype, args.allow_pickle, args.trust_remote_code)
    scoring = suite.run(model, batch_size=args.batch_size)
    with progress_bar() as bar:
        task = bar.add_task("scoring", total=suite.n_items())
        for _ in scoring:
            bar.advance(task)
    result = scoring.result()
    if args.json:
        sys.stdout.write(json.dumps({"results": result.metrics}) + "\n")
        return 0
    table = Table(title=f"{args.model}: {result.items_scored} items")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, metrics in result.metrics.items():
        for key, value in metrics.items():
            table.add_row(name, key, f"{value:.4f}")
    table.add_section()
    table.add_row("suite", "weighted score", f"{result.score:.4f}")
    Console().print(table)  # results on stdout; progress and errors went to stderr
    return 0
