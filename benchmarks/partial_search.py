"""Per-candidate build when a study searches only part of a recipe: merged in full vs unchanged skipped.

    nice .venv/bin/python benchmarks/partial_search.py [--layers 4] [--repeats 5] [--method slerp|ties]

On benchmarks/merge_speed.py's phi-2-shaped family, two candidates of one recipe that differ only in
the `self_attn` entry of their parameter (SLERP's t, or TIES's per-model weight): the mlp entry, the
default for every other tensor and everything else are the same. One child process builds them in
turn (A, B, A, B...) into a live model twice: with `Merger(skip_unchanged=False)` (the anchor: every
output merged, as mergekit-evolve does) and with the default, where only the outputs whose values
changed are merged. Prints the median build time of each, the ratio, and the outputs merged per build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_speed import make_family, median_time  # noqa: E402


def candidate(root: Path, method: str, attn) -> dict:
    """The recipe with `attn` as the self_attn entry of its searched parameter."""
    entries = [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": [0.9, 0.4]}, {"value": 0.5}]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(root / "base"), "dtype": "float16",
                "models": [{"model": str(root / "base")}, {"model": str(root / "child_1")}],
                "parameters": {"t": entries}}
    return {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float16",
            "models": [{"model": str(root / "base")}] + [
                {"model": str(root / child), "parameters": {"weight": entries, "density": 0.5}}
                for child in ("child_1", "child_2")]}


def child(root: Path, method: str, repeats: int) -> dict:
    from merge_core.config import parse_config
    from merge_core.merger import MergePlan, Merger

    configs = [parse_config(candidate(root, method, attn)) for attn in ([0.2, 0.8], [0.7, 0.1])]
    result = {}
    for skip in (False, True):
        merger = Merger(MergePlan(configs[0]), seed=0, skip_unchanged=skip)
        model = merger.new_model()
        merger.build_into(model, configs[0])
        merged = []

        def build(i: int, merger=merger, model=model, merged=merged) -> None:
            merged.append(merger.build_into(model, configs[(i + 1) % 2]))

        result[str(skip)] = median_time(build, repeats)
        result[f"merged {skip}"] = merged[-1]
        result["outputs"] = len(merger.plan.outputs)
        del merger, model, build
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", choices=("slerp", "ties"), default="slerp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.method, args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="partial-search-") as tmp:
        root = Path(tmp)
        make_family(root, args.layers)
        output = subprocess.run([sys.executable, __file__, "--child", str(root), "--method", args.method,
                                 "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        r = json.loads(output.stdout.strip().splitlines()[-1])
    full, skipped = r["False"], r["True"]
    print(f"{args.method}, {args.layers} layers, candidates differing in self_attn only; median of {args.repeats}")
    print(f"every output merged      {full:.3f} s   ({r['merged False']} of {r['outputs']} outputs)")
    print(f"unchanged ones skipped   {skipped:.3f} s   ({r['merged True']} of {r['outputs']} outputs)")
    print(f"ratio                    {full / skipped:.1f}x faster")


if __name__ == "__main__":
    main()
