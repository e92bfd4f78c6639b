"""`search merge CONFIG.yml OUT_DIR`: a drop-in for `mergekit-yaml` on every supported method, and for
`mergekit-multi` on multi-document configs (stages built in memory, only the final model written)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `merge` sub-command."""
    parser = sub.add_parser("merge", help="build a mergekit config into a model folder (like mergekit-yaml)")
    parser.add_argument("config", help="mergekit YAML (any supported merge_method), or a mergekit-multi file")
    parser.add_argument("out_dir", help="folder to write the merged model to")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--random-seed", type=int, default=None,
                        help="seed for DARE/DELLA masks (the masks mergekit-yaml --random-seed draws)")
    parser.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights")
    parser.add_argument("--lora-merge-cache", default=None, metavar="DIR",
                        help="where models with a LoRA adapter (model+adapter) are kept once merged "
                             "(default $MERGE_SEARCH_LORA_CACHE, else ~/.cache/merge-search/lora)")
    parser.add_argument("--lora-merge-dtype", default=None, metavar="DTYPE",
                        help="dtype to apply LoRA adapters in (default: the model's own), as mergekit-yaml's")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="say what is merged before merging (-vv: also merge_core's debug log)")
    _add_mergekit_flags(parser)
    parser.set_defaults(func=run)


# mergekit-yaml's flags that only tune how it runs: merge-search always maps the parents and streams
# the output, so scripts written for mergekit-yaml run unchanged and these change nothing.
NO_EFFECT_SWITCHES = ("lazy-unpickle", "low-cpu-memory", "read-to-gpu", "async-write",
                      "clone-tensors", "multi-gpu")


def _add_mergekit_flags(parser: argparse.ArgumentParser) -> None:
    """mergekit-yaml's options, so that its command lines work here as they are."""
    group = parser.add_argument_group("mergekit-yaml options")
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--cuda", action=on_off, default=False, help="same as --device cuda")
    group.add_argument("--out-shard-size", default="5B", metavar="SIZE",
                       help="bytes per output shard, as mergekit-yaml counts them: 5B, 500M, 1000000 (default 5B)")
    group.add_argument("--copy-tokenizer", action=on_off, default=True,
                       help="write the reference model's tokenizer next to the weights (default: yes)")
    group.add_argument("--write-model-card", action=on_off, default=True,
                       help="write README.md and mergekit_config.yml (default: yes; mergekit-yaml's switch "
                            "skips both)")
    group.add_argument("--safe-serialization", action=on_off, default=True,
                       help="safetensors output, the only kind written here")
    group.add_argument("--quiet", action=on_off, default=False, help="no progress bar")
    group.add_argument("--allow-crimes", action=on_off, default=False,
                       help="merge models of different model types where their tensors line up (names and shapes)")
    group.add_argument("--transformers-cache", default=None, metavar="DIR",
                       help="Hugging Face cache folder for Hub models (sets HF_HUB_CACHE)")
    group.add_argument("--trust-remote-code", action=on_off, default=False,
                       help="load tokenizers that need their repository's code (tokenizer_source); "
                            "model code is never run: the merge reads tensors, and the code files "
                            "named in auto_map are copied to OUT_DIR either way")
    group.add_argument("--unsafe-truncate-embeddings", action=on_off, default=False,
                       help="without a tokenizer source, cut the embeddings and head of models whose "
                            "vocabularies differ in size to the fewest rows (assumes the shared ids mean the "
                            "same tokens)")
    for name in NO_EFFECT_SWITCHES:
        group.add_argument(f"--{name}", action=on_off, default=False, help=argparse.SUPPRESS)
    group.add_argument("--gpu-rich", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--write-threads", type=int, default=None, help=argparse.SUPPRESS)
    group.description = (f"accepted with no effect: --{', --'.join(NO_EFFECT_SWITCHES)}, --gpu-rich, "
                         "--write-threads (the parents are always mapped and the output streamed)")


def parse_size(text: str) -> int:
    """mergekit's parse_kmb: `5B`, `500M`, `100K` (powers of 1000) or a plain count; 0 means one shard."""
    from merge_core.errors import MergeInputError

    value = str(text).strip()
    scale = {"k": 1000, "m": 1000**2, "b": 1000**3}.get(value[-1:].lower(), 1)
    digits = value[:-1] if scale > 1 else value
    if not digits.isdigit():
        raise MergeInputError(f"--out-shard-size {text!r}: give a size like 5B, 500M, 100K or a number of bytes")
    return int(digits) * scale


def _check_mergekit_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line, the mergekit-yaml options whose effect merge-search does not have."""
    import os

    from merge_core.errors import MergeInputError

    if args.random_seed is not None and not 0 <= args.random_seed < 2**32:
        raise MergeInputError(f"--random-seed {args.random_seed}: give a whole number from 0 to {2**32 - 1} "
                              "(the seeds mergekit-yaml takes)")
    if not args.safe_serialization:
        raise MergeInputError("--no-safe-serialization: search merge writes safetensors only; drop the flag")
    if args.trust_remote_code:
        from merge_core.vocabulary import trust_remote_code

        trust_remote_code()
    if args.cuda or args.gpu_rich:
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda"):
            raise MergeInputError(f"--cuda and --device {args.device} disagree; give one of them")
        if args.device == "cpu":
            args.device = "cuda"
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = str(Path(args.transformers_cache).expanduser())
    args.max_shard_bytes = parse_size(args.out_shard_size)


def run(args: argparse.Namespace) -> int:
    """Plan, then merge and write tensor by tensor behind a progress bar; a user's error names the config."""
    from search.interrupts import SignalGuard

    # Ctrl-C / SIGTERM are held until the next tensor (one landing inside torch's or transformers'
    # imports would break them), then end the run with nothing written; a second one ends it at once.
    with SignalGuard() as guard, guard.deferred():
        return _checked_run(args, guard)


def _checked_run(args: argparse.Namespace, guard) -> int:
    from merge_core import lora
    from merge_core.errors import MergeInputError

    _check_mergekit_flags(args)
    lora.configure(args.lora_merge_cache, args.lora_merge_dtype)
    try:
        return _run(args, guard)
    except MergeInputError as exc:
        if str(exc).startswith(str(args.config)):
            raise
        raise MergeInputError(f"{args.config}: {exc}") from None


def _run(args: argparse.Namespace, guard) -> int:
    import os

    from merge_core.card import model_card
    from merge_core.chain import ChainPlan, is_chain, parse_chain
    from merge_core.config import parse_config, read_yaml_documents
    from merge_core.merger import MergePlan, stream_tensors
    from merge_core.writer import output_config, prepare_output, write_model
    from search.devices import check_device
    from search.progress import console, progress_bar

    docs = read_yaml_documents(args.config)
    yaml_text = Path(args.config).read_text(encoding="utf-8")  # mergekit keeps the file's text, comments and all
    device = check_device(args.device)
    out = prepare_output(args.out_dir, args.overwrite)
    stages: frozenset[str] = frozenset()
    if is_chain(docs):
        chain = ChainPlan(parse_chain(docs, args.config), args.allow_pickle, device, args.random_seed, args.config,
                          truncate_vocabulary=args.unsafe_truncate_embeddings, allow_crimes=args.allow_crimes)
        plan, config, stages = chain.final, chain.final.config, frozenset(chain.outputs)
        plans = chain.plans
        stage_names = [stage.name or "(final)" for stage in chain.stages]
    else:
        config = parse_config(docs[0] if docs else None, args.config)
        plan = MergePlan(config, allow_pickle=args.allow_pickle, truncate_vocabulary=args.unsafe_truncate_embeddings,
                         allow_crimes=args.allow_crimes)
        plans = [plan]
        stage_names = [None]
    folders = {w.folder for p in plans for w in p.weights if hasattr(w, "folder")}
    out = prepare_output(args.out_dir, args.overwrite, keep=[Path(args.config), *folders])
    _say_adapters(plans)
    _warn_draw_order(plans, args.random_seed)
    _warn_ignored_parameters(plans)
    _warn_post_sources_dropped(plans, stage_names)
    _warn_truncation(plans)
    merged_config = output_config(plan)
    tokenizer_folder, tokenizer = plan.output_tokenizer()
    if tokenizer is None and not args.copy_tokenizer:
        tokenizer_folder = None  # mergekit-yaml --no-copy-tokenizer: a built tokenizer is still written
    elif tokenizer is None and not tokenizer_folder:
        console.print(f"[yellow]no tokenizer written: {plan.reference.folder} has none that loads[/yellow]")
    layout = [(o.name, tuple(plan.shape(o)), plan.output_dtype(o)) for o in plan.outputs]
    if args.verbose:
        _say_plan(plan, layout, tokenizer_folder, tokenizer, args.verbose)
    guard.check()  # a signal held while planning: stop before anything is written
    card = model_card(config, yaml_text, name=os.path.basename(args.out_dir), local=stages)
    with progress_bar() as bar:
        writing = bar.add_task("merging + writing", total=len(plan.outputs), visible=not args.quiet)
        write_model(
            out, stream_tensors(plan, device, seed=args.random_seed), layout, merged_config,
            tokenizer_folder, yaml_text if args.write_model_card else None,
            card=card if args.write_model_card else None, tokenizer=tokenizer,
            progress=lambda: (bar.advance(writing), guard.check()), overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_bytes, before_replace=guard.check,
            code_folders=(plan.reference.folder,) if hasattr(plan.reference, "folder") else (),
        )
    guard.received = None  # the model is in place: a signal from here on has nothing left to stop
    seed = "" if not plan.method.randomised or args.random_seed is None else f", random seed {args.random_seed}"
    console.print(f"wrote {len(plan.outputs)} tensors ({plan.num_layers} layers, {config.merge_method}{seed}) to {out}")
    return 0


def _say_plan(plan, layout, tokenizer_folder, tokenizer, verbosity: int) -> None:
    """`-v`: the merge about to run, in a few lines (mergekit-yaml -v logs its steps)."""
    import logging
    from functools import partial

    from merge_core.writer import tensor_bytes
    from search.progress import console

    base = plan.config.base_model
    models = ", ".join(m + (" (base)" if m == base else "") for m in plan.models)
    dtypes = sorted({str(dtype).removeprefix("torch.") for _, _, dtype in layout})
    size = sum(tensor_bytes(shape, dtype) for _, shape, dtype in layout)
    say = partial(console.print, soft_wrap=True)
    say(f"{plan.config.merge_method} of {len(plan.models)} models: {models}")
    say(f"{len(layout)} tensors to write ({plan.num_layers} layers, {'/'.join(dtypes)}, {size / 1024**2:,.1f} MiB); "
        f"config.json from {plan.reference.folder}")
    if tokenizer is not None:
        say(f"tokenizer: built ({len(tokenizer)} tokens), saved through transformers")
    elif tokenizer_folder is not None:
        say(f"tokenizer: files copied from {tokenizer_folder}")
    if verbosity > 1:
        logging.basicConfig(format="%(levelname)s:%(name)s:%(message)s")
        logging.getLogger("merge_core").setLevel(logging.DEBUG)


def _say_adapters(plans) -> None:
    """Where the models with a LoRA adapter were merged (peft, once per model, adapter and dtype)."""
    from merge_core.lora import cache_folder
    from merge_core.refs import split_adapter
    from search.progress import console

    adapted = sorted({m for plan in plans for m in plan.models if split_adapter(m)[1] is not None})
    if adapted:
        names = ", ".join(adapted[:2]) + (", ..." if len(adapted) > 2 else "")
        console.print(f"models with a LoRA adapter ({names}) read from the LoRA cache {cache_folder()} "
                      "(each applied once with peft, as mergekit-yaml applies them)")


def _warn_ignored_parameters(plans) -> None:
    """One line per stage that sets parameters its method does not take (mergekit ignores them too)."""
    from search.progress import console

    for plan in plans:
        if plan.ignored_parameters:
            names = ", ".join(plan.ignored_parameters[:3]) + (", ..." if len(plan.ignored_parameters) > 3 else "")
            console.print(f"[yellow]{plan.method.name} does not take {names}: ignored, as mergekit ignores them "
                          f"({plan.method.name} takes {', '.join(p.name for p in plan.method.params) or 'none'})"
                          "[/yellow]")


def _warn_post_sources_dropped(plans, stage_names: list[str | None]) -> None:
    """One line per stage whose last slice has more sources than its first (mergekit's pairing drops
    some), naming the stage in a chain."""
    from search.progress import console

    for plan, stage in zip(plans, stage_names, strict=True):
        dropped = plan.post_sources_dropped
        if dropped:
            where = f"stage {stage}: " if stage else ""
            console.print(f"[yellow]{where}the last slice has more sources than the first: the tensors after the "
                          f"layers (final norm, lm_head) are merged without {', '.join(dropped)}, as mergekit merges "
                          "them (one input per source of the first slice)[/yellow]", soft_wrap=True)


def _warn_truncation(plans) -> None:
    """--unsafe-truncate-embeddings: one line per stage whose vocabularies are cut (mergekit warns per tensor)."""
    from merge_core.vocabulary import TruncatedVocabulary, vocab_rows
    from search.progress import console

    for plan in plans:
        if isinstance(plan.vocabulary, TruncatedVocabulary):
            sizes = ", ".join(str(vocab_rows(w.config)) for w in plan.weights)
            console.print(f"[yellow]--unsafe-truncate-embeddings: the models' token-indexed tensors ({sizes} rows) "
                          f"are cut to their first {plan.vocabulary.rows}, and config.json's vocab_size set to "
                          "that[/yellow]", soft_wrap=True)


def _warn_draw_order(plans, seed: int | None) -> None:
    """One line when some DARE/DELLA masks cannot follow mergekit-yaml --random-seed's draw order."""
    from search.progress import console

    if seed is None:
        return
    tied = [name for plan in plans if plan.method.randomised for name in plan.order_ties()]
    if tied:
        console.print(f"[yellow]{len(tied)} tensors ({tied[0]}, ...) share their largest source tensor with another "
                      "output: mergekit merges those in its task graph's internal order, so their masks may differ "
                      "from mergekit-yaml --random-seed's (README: DARE/DELLA masks)[/yellow]")
    twice = [name for plan in plans if plan.method.randomised for name in plan.merged_twice_by_mergekit()]
    if twice:
        console.print(f"[yellow]mergekit merges {len(twice)} tensors ({twice[0]}, ...) twice (its architecture file "
                      "lists them as a module of two layers) and writes the second: its draws for the first shift "
                      "the masks of those tensors and of every tensor merged after them away from mergekit-yaml "
                      "--random-seed's (README: DARE/DELLA masks)[/yellow]")
    if any(plan.method.randomised and any(getattr(w, "stacks_experts", False) for w in plan.weights) for plan in plans):
        console.print("[yellow]the models' expert tensors are stacked from per-expert ones, which mergekit merges "
                      "first, in its task graph's internal order: the masks are drawn in another order than "
                      "mergekit-yaml --random-seed's (README: DARE/DELLA masks)[/yellow]")
