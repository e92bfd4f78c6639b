"""Per-candidate build of a three-stage chain against one stage, on the phi-2-shaped family.

    nice .venv/bin/python benchmarks/chain_speed.py [--layers 2] [--repeats 3]

The family is benchmarks/merge_speed.py's (a random fp16 base and three fine-tune-like
children). Both builds run in child processes of their own and write a candidate into a live model:
  one stage    SLERP(child_1, child_2) with Merger (theta prepared once per study)
  three stages SLERP(child_1, child_2) -> SLERP(that, child_3) -> SLERP(that, base) with ChainMerger:
               earlier stages are merged per tensor as the last one reads them, and each stage's theta
               against a merged tensor is computed per candidate
The floor of each is the sum of its stages' floors: every stage reads its two inputs and writes one
output once, at the copy bandwidth measured in the same process. Peak RSS is VmHWM of each child.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_speed import make_family, median_time, peak_rss  # noqa: E402


def stage(name: str | None, base: str, other: str, t) -> dict:
    doc = {"merge_method": "slerp", "base_model": base, "dtype": "float16",
           "models": [{"model": base}, {"model": other}], "parameters": {"t": t}}
    return ({"name": name} if name else {}) | doc


def chain_docs(root: Path, t) -> list[dict]:
    c1, c2, c3, base = (str(root / n) for n in ("child_1", "child_2", "child_3", "base"))
    return [stage("one", c1, c2, t), stage("two", "one", c3, t), stage(None, "two", base, t)]


def child(kind: str, root: Path, repeats: int) -> dict:
    from merge_core.chain import ChainMerger, ChainPlan, parse_chain
    from merge_core.config import parse_config
    from merge_core.merger import MergePlan, Merger

    ts = [[0.2, 0.8], [0.6, 0.3]]
    if kind == "one":
        configs = [parse_config({k: v for k, v in chain_docs(root, t)[0].items() if k != "name"}) for t in ts]
        merger = Merger(MergePlan(configs[0]), seed=0, skip_unchanged=False)
        model = merger.new_model()
        build = median_time(lambda i: merger.build_into(model, configs[(i + 1) % 2]), repeats)
        stages = [merger.plan]
    else:
        chains = [parse_chain(chain_docs(root, t)) for t in ts]
        plan = ChainPlan(chains[0], seed=0)
        merger = ChainMerger(plan)
        model = merger.new_model()
        build = median_time(lambda i: merger.build_into(model, chains[(i + 1) % 2]), repeats)
        stages = plan.plans
    rss = peak_rss()
    # The floor: per stage, read two inputs and write one output, at the measured copy bandwidth.
    target = next(iter(model.parameters())).data
    sample = torch.empty_like(target)
    copy = median_time(lambda i: sample.copy_(target), repeats)
    bandwidth = 2 * target.numel() * target.element_size() / copy
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    floor = len(stages) * 3 * model_bytes / bandwidth
    return {"build": build, "floor": floor, "rss": rss, "stages": len(stages), "model_bytes": model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="chain-speed-") as tmp:
        root = Path(tmp)
        make_family(root, args.layers)
        (root / "chain.yml").write_text(yaml.safe_dump_all(chain_docs(root, 0.5)))
        results = {}
        for kind in ("one", "three"):
            done = subprocess.run([sys.executable, __file__, "--child", kind, str(root), "--repeats",
                                   str(args.repeats)], capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    one, three = results["one"], results["three"]
    gib = 1024**3
    print(f"phi-2-shaped family, {args.layers} layers, float16, one model {one['model_bytes'] / gib:.2f} GiB; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} builds")
    for name, r in (("one stage (Merger)", one), ("three stages (ChainMerger)", three)):
        print(f"{name:<28} build {r['build']:.3f} s  floor {r['floor']:.3f} s ({r['stages']} x read 2 + write 1)  "
              f"{r['build'] / r['floor']:.2f}x floor  peak RSS {r['rss'] / gib:.2f} GiB "
              f"({r['rss'] / r['model_bytes']:.2f}x model)")
    print(f"three stages / one stage: build {three['build'] / one['build']:.2f}x, "
          f"peak RSS {three['rss'] / one['rss']:.2f}x")


if __name__ == "__main__":
    main()
