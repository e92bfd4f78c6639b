"""`search merge CONFIG.yml OUT_DIR`: a drop-in for `mergekit-yaml` on slerp configs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `merge` sub-command."""
    parser = sub.add_parser("merge", help="build a mergekit slerp config into a model folder")
    parser.add_argument("config", help="mergekit YAML (merge_method: slerp)")
    parser.add_argument("out_dir", help="folder to write the merged model to")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, merge and write the folder, with progress bars."""
    from merge_core.config import load_config
    from merge_core.merger import MergePlan, Merger
    from merge_core.refs import resolve
    from merge_core.writer import prepare_output, write_model
    from search.devices import check_device
    from search.progress import console, progress_bar

    config = load_config(args.config)
    device = check_device(args.device)
    out = prepare_output(args.out_dir, args.overwrite)
    plan = MergePlan(config, allow_pickle=args.allow_pickle)
    tokenizer_folder = plan.base.folder
    if config.tokenizer_source not in (None, "base"):
        tokenizer_folder = resolve(config.tokenizer_source, args.allow_pickle)
    with progress_bar() as bar:
        loading = bar.add_task("loading parents", total=len(plan.outputs))
        merger = Merger(plan, device, progress=lambda done, _: bar.update(loading, completed=done))
        writing = bar.add_task("merging + writing", total=len(plan.outputs))
        write_model(
            out, merger.tensors(), plan.merged_config(), tokenizer_folder, config.to_yaml(),
            progress=lambda: bar.advance(writing), overwrite=args.overwrite,
        )
    console.print(f"wrote {len(plan.outputs)} tensors ({plan.num_layers} layers, {config.dtype}) to {out}")
    return 0
