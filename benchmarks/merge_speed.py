"""Candidate build speed and memory of every merge method, against the bandwidth floor and mergekit.

    nice .venv/bin/python benchmarks/merge_speed.py [--layers 4] [--repeats 3] [--methods ties,sce+select_topk]
                                                    [--end-to-end slerp,ties|none] [--mergekit-repeats 1]
                                                    [--threads 1]

Writes a phi-2-shaped family to a temporary folder (hidden 2560, intermediate 10240, vocab 51200,
float16): a base with random weights (N(0, 0.02)) and three fine-tune-like children, each the base
plus a small random delta (N(0, 0.002)), saved directly as safetensors. Every method merges three
models where its input contract allows: the base + children 1 and 2 for methods that take a base
(task_arithmetic, ties...), children 1-3 for methods that ignore it (linear); fewer where the
contract caps them (slerp: base + child 1, passthrough: child 1); a method the family cannot feed
is skipped with the reason printed.

Per method, in one run:
  ours        `Merger(plan, skip_unchanged=False)` once (inputs mapped, `prepare` run), then
              `build_into(live model, candidate)`: one warm-up build, then the median of --repeats
              builds that alternate two parameter sets (A, B, A, B... candidate configs with the same
              structure); every output is merged in every build (a study's merger skips the tensors
              whose values did not change, which would measure nothing for sce's parameter-free
              A and B); a warm-up slower than --slow (20 s) is
              taken as the measurement (one build), which overstates a method that defers per-study
              work to its first candidate (rerun it with --slow 1e9). Runs in a child process.
  floor       the memory-bandwidth floor of one build: every input tensor read once and the output
              written once. The copy bandwidth is measured in the same child on the same tensors:
              `target.copy_(input)` for every input of every output, median of --repeats passes,
              counted as 2 x input bytes moved (read + write). floor = (bytes of all inputs + bytes
              of the output) / that bandwidth.
  mergekit    mergekit's in-memory path per candidate, as mergekit-evolve uses it: MergePlanner +
              Executor over ReturnTensor tasks, each result copied into a live transformers model;
              median of --mergekit-repeats builds (no warm-up; the parents sit in the page cache
              since they were just written), alternating the same A and B configs, in a child
              process with the torch RNG seeded once (0).
  peak RSS    VmHWM of our child after set-up and all builds (before the floor is measured),
              as a multiple of one model's tensor bytes; target (inputs + 1.3) x one model.

End to end (--end-to-end), each a fresh process on the same family and config, run one after the
other: `python -m search.cli merge CONFIG OUT --random-seed 0` against `mergekit-yaml CONFIG OUT
--random-seed 0`, wall time from the parent and peak RSS from /usr/bin/time -v (getrusage of the
children when that is missing), for SLERP (base + child 1, the phigment6 t gradients) and TIES
(base + children 1 and 2, the ties row's parameter set A). Before every run the page cache is
settled the same way for both tools: dirty pages flushed (`sync`, so no run pays for writing back
the previous one's output) and the family's files read once (so both read their parents from
memory). With --end-to-end-repeats N the tools alternate N times and the medians are compared.
Target: ours >= 3x faster with a lower peak RSS.

--threads N sets torch's thread count in every child (ours, its floor, and mergekit): on a machine
whose cores other work keeps busy, each two-thread torch operation waits for a descheduled thread,
which swamps chunked passes of many short operations; one thread on both sides measures the work.

Targets (issue 10): linear, task_arithmetic, slerp, nuslerp, multislerp <= 2x their floor; every
deterministic method >= 10x and DARE/DELLA (randomised) >= 5x faster than mergekit's in-memory
path per candidate; peak RSS <= (inputs + 1.3) x one model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 1024**3
CHILDREN = ("child_1", "child_2", "child_3")
FLOOR_METHODS = {"linear", "task_arithmetic", "slerp", "nuslerp", "multislerp"}
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]
# Two parameter sets per parameter name: per input (cycled) for set A and set B. Names not listed
# here take their default, or 0.5 / 0.6 when required.
VALUES = {
    "weight": ([[{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}], 0.3, 0.4],
               [[{"filter": "mlp", "value": [0.7, 0.3]}, {"value": 0.4}], 0.5, 0.35]),
    "density": ([0.5, [0.3, 0.7], 0.6], [0.6, [0.4, 0.8], 0.5]),
    "epsilon": ([0.1, 0.15, 0.1], [0.15, 0.1, 0.2]),
    "gamma": ([0.01, 0.02, 0.01], [0.02, 0.01, 0.03]),
    "lambda": ([1.0], [0.9]),
    "t": ([SLERP_T], [[{"filter": "self_attn", "value": [1, 0.6, 0.2]}, {"value": 0.4}]]),
    "scale": ([1.0], [0.9]),
    "select_topk": ([0.5], [0.6]),
}
# Optional parameters set only when the method is named with them: `--methods sce+select_topk`.
OPT_IN = {"select_topk"}


# --- the family -------------------------------------------------------------------------------
def make_family(root: Path, layers: int) -> int:
    """Base (random fp16) and three children (base + small random delta), safetensors; one model's bytes."""
    import transformers
    from safetensors.torch import save_file

    from tests.conftest import save_tokenizer

    config = transformers.PhiConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
                                    num_attention_heads=32, vocab_size=51200, partial_rotary_factor=0.4,
                                    dtype="float16", architectures=["PhiForCausalLM"])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.PhiForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).half() for n, s in shapes.items()}
    for name in ("base", *CHILDREN):
        tensors = base if name == "base" else {
            n: (t.float() + torch.randn(t.shape, generator=gen) * 0.002).half() for n, t in base.items()}
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(folder)
        save_tokenizer(folder)
        del tensors
    return sum(t.numel() * t.element_size() for t in base.values())


def family_models(method_name: str) -> tuple[list[str], bool] | str:
    """(models to merge, whether base_model is set) for a method, or why the family cannot feed it."""
    from merge_core import methods

    contract = methods.get(method_name).contract
    take = len(CHILDREN) if contract.max_inputs is None else contract.max_inputs
    if contract.base in ("required", "optional"):  # a base given is one of the inputs
        models = ["base", *CHILDREN][:take]
    else:
        models = list(CHILDREN[:take])
    if len(models) < contract.min_inputs:
        return f"needs at least {contract.min_inputs} models; the family has {len(CHILDREN) + 1}"
    return models, contract.base in ("required", "optional")


def method_config(root: Path, name: str, which: int) -> dict | str:
    """A `models:` config for the method with parameter set `which` (0 = A, 1 = B), or a skip reason.

    `name` is a method, or a method and optional parameters it sets too: `sce+select_topk`."""
    from merge_core import methods

    method_name, *optional = name.split("+")
    method = methods.get(method_name)
    found = family_models(method_name)
    if isinstance(found, str):
        return found
    models, with_base = found
    if method_name == "slerp":  # the seed recipe's form: slices with the t gradients
        return {"slices": [{"sources": [{"model": str(root / m), "layer_range": [0, _layers(root)]} for m in models]}],
                "merge_method": "slerp", "base_model": str(root / "base"), "dtype": "float16",
                "parameters": {"t": VALUES["t"][which][0]}}
    shared, per_model = {}, [{} for _ in models]
    for param in method.params:
        options = VALUES.get(param.name)
        if options is None and not param.required or param.name in OPT_IN and param.name not in optional:
            continue
        if options is None:
            options = ([0.5], [0.6])
        values = options[which]
        if param.scope == "global":
            shared[param.name] = values[0]
            continue
        k = 0
        for i, m in enumerate(models):
            if param.scope == "per_non_base" and with_base and m == "base":
                continue
            per_model[i][param.name] = values[k % len(values)]
            k += 1
    entries = [{"model": str(root / m)} | ({"parameters": p} if p else {}) for m, p in zip(models, per_model,
                                                                                           strict=True)]
    config = {"models": entries, "merge_method": method_name, "dtype": "float16"}
    if with_base:
        config["base_model"] = str(root / "base")
    if shared:
        config["parameters"] = shared
    return config


def _layers(root: Path) -> int:
    return json.loads((root / "base" / "config.json").read_text())["num_hidden_layers"]


# --- child processes --------------------------------------------------------------------------
def median_time(fn, repeats: int, warmup: bool = True, slow: float = 20.0) -> float:
    """Median wall time of fn(i) for i in range(repeats), after one warm-up call fn(-1) when asked.

    A warm-up call slower than `slow` seconds is the measurement itself (first-touch costs are noise
    at that scale), so a slow method costs one build instead of repeats + 1.
    """
    if warmup:
        start = time.perf_counter()
        fn(-1)
        first = time.perf_counter() - start
        if first > slow:
            return first
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: ru_maxrss would keep the forking parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_ours(configs: list[Path], repeats: int, slow: float = 20.0) -> dict:
    """Set-up, candidate build time, peak RSS, then the copy-bandwidth floor on the same tensors."""
    from merge_core.config import load_config
    from merge_core.merger import MergePlan, Merger

    candidates = [load_config(p) for p in configs]
    start = time.perf_counter()
    merger = Merger(MergePlan(candidates[0]), seed=0, skip_unchanged=False)
    model = merger.new_model()
    setup = time.perf_counter() - start
    build = median_time(lambda i: merger.build_into(model, candidates[(i + 1) % 2]), repeats, slow=slow)
    rss = peak_rss()  # before the floor adds its own

    targets = merger.targets(model)
    pairs = [(targets[o.name], x) for o, inputs in zip(merger.plan.outputs, merger._inputs, strict=True)
             for x in inputs.tensors]
    read = sum(x.numel() * x.element_size() for _, x in pairs)
    written = sum(targets[o.name].numel() * targets[o.name].element_size() for o in merger.plan.outputs)
    copy = median_time(lambda i: [out.copy_(x) for out, x in pairs], repeats)
    bandwidth = 2 * read / copy
    return {"setup": setup, "build": build, "rss": rss, "inputs": len(merger.plan.models), "read": read,
            "written": written, "bandwidth": bandwidth, "floor": (read + written) / bandwidth}


def child_mergekit(configs: list[Path], repeats: int, slow: float = 20.0) -> dict:
    """mergekit's in-memory path: plan + Executor, every result copied into a live model."""
    import transformers
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, ReturnTensor
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    torch.manual_seed(0)
    candidates = [MergeConfiguration.model_validate(yaml.safe_load(p.read_text())) for p in configs]
    options = MergeOptions(quiet=True)
    LoaderCache().setup(options)
    first = candidates[0]
    reference = first.base_model or first.referenced_models()[0]
    base_cfg = transformers.AutoConfig.from_pretrained(str(reference.model.path))
    arch = get_architecture_info(first, options)
    model = transformers.AutoModelForCausalLM.from_config(base_cfg, dtype=torch.float16)
    params = dict(model.named_parameters())

    def build(i: int) -> None:
        config = candidates[i % 2]
        # MergePlanner.plan_in_memory() as mergekit-evolve calls it; mergekit 0.1.5's ReturnTensor fails
        # pydantic validation of its generic Task field, so construct the same tasks without validating.
        planner = MergePlanner(config, arch, options, base_cfg)
        planner._plan()
        tasks = [ReturnTensor.model_construct(weight_info=w, tensor_task=t, dtype=w.force_dtype or config.out_dtype)
                 for w, t in planner._tensors]
        for task, value in Executor(tasks, math_device="cpu", storage_device="cpu").run(quiet=True):
            params[task.weight_info.name].data.copy_(value)

    build_time = median_time(build, repeats, warmup=False)
    return {"build": build_time, "rss": peak_rss()}


def run_child(kind: str, configs: list[Path], repeats: int, slow: float, threads: int | None = None) -> dict:
    """Runs a child mode of this script; its last stdout line is JSON."""
    threading = ["--threads", str(threads)] if threads else []
    done = subprocess.run([sys.executable, __file__, "--repeats", str(repeats), "--slow", str(slow), *threading,
                           "--child", kind, *map(str, configs)], capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def settle_page_cache(root: Path) -> None:
    """Flush dirty pages and read the family's files once, so every timed run starts alike."""
    os.sync()
    for path in sorted(root.glob("*/*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def median_run(runs: list[tuple[float, int, str | None]]) -> tuple[float, int, str | None]:
    """The run of median wall time (the first failure, if any run failed)."""
    failed = [run for run in runs if run[2]]
    return failed[0] if failed else sorted(runs)[len(runs) // 2]


def timed_process(command: list[str]) -> tuple[float, int, str | None]:
    """(wall seconds, peak RSS bytes, error line or None) of one command in a fresh process."""
    if Path("/usr/bin/time").exists():
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        line = next(ln for ln in done.stderr.splitlines() if "Maximum resident set size" in ln)
        rss = int(line.rsplit(":", 1)[1]) * 1024
    else:
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        rss = int(done.stderr.strip().splitlines()[-1]) * 1024
    error = None
    if done.returncode:
        lines = done.stderr.split("Command being timed")[0].strip().splitlines()
        error = lines[-1] if lines else f"exit {done.returncode}"
    return wall, rss, error


# --- the table --------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    """met / MISSED."""
    return "met" if ok else "MISSED"


def method_rows(name: str, ours: dict, mk: dict, model_bytes: int) -> list[tuple[str, ...]]:
    """Table rows for one method: floor, mergekit in-memory, peak RSS."""
    from merge_core import methods

    if "error" in ours:
        return [(name, "ours failed", ours["error"][:90], "", "", "")]
    randomised = methods.get(name.split("+")[0]).randomised
    rows = []
    x_floor = ours["build"] / ours["floor"]
    target = "<= 2x" if name in FLOOR_METHODS else "(none)"
    ok = verdict(x_floor <= 2) if name in FLOOR_METHODS else "-"
    rows.append((name, f"build vs floor ({ours['inputs']} in)", f"{ours['build']:.3f} s / {ours['floor']:.3f} s",
                 f"{x_floor:.2f}x floor", target, ok))
    if mk is None:
        rows.append((name, "vs mergekit in-memory", "not run", "", "", ""))
    elif "error" in mk:
        rows.append((name, "vs mergekit in-memory", "mergekit failed: " + mk["error"][:70], "", "", ""))
    else:
        speedup = mk["build"] / ours["build"]
        need = 5 if randomised else 10
        rows.append((name, "vs mergekit in-memory", f"{mk['build']:.2f} s", f"{speedup:.1f}x faster",
                     f">= {need}x", verdict(speedup >= need)))
    limit = ours["inputs"] + 1.3
    rss_x = ours["rss"] / model_bytes
    rows.append((name, "peak RSS (merger+model)", f"{ours['rss'] / GIB:.2f} GiB", f"{rss_x:.2f}x model",
                 f"<= {limit:.1f}x", verdict(rss_x <= limit)))
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Plain aligned columns (pasted into BENCHMARKS.md as is)."""
    header = ("method", "measure", "value", "ratio", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed candidate builds per method (median)")
    parser.add_argument("--mergekit-repeats", type=int, default=1,
                        help="timed mergekit in-memory builds per method (0: not run)")
    parser.add_argument("--slow", type=float, default=20.0,
                        help="a warm-up build slower than this many seconds is taken as the measurement")
    parser.add_argument("--methods", default="", help="comma list (default: every registered method)")
    parser.add_argument("--end-to-end", default="slerp,ties", help="comma list of slerp, ties; or none")
    parser.add_argument("--end-to-end-repeats", type=int, default=1, help="alternating runs per tool (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every child, ours and mergekit alike (default: torch's)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, *paths = args.child
        fn = child_ours if kind == "ours" else child_mergekit
        print(json.dumps(fn([Path(p) for p in paths], args.repeats, args.slow)))
        return

    from merge_core import methods

    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] or methods.names()
    for m in chosen:
        methods.get(m.split("+")[0])  # an unknown name fails now, with the closest one
    end_to_end = [] if args.end_to_end == "none" else [m.strip() for m in args.end_to_end.split(",") if m.strip()]
    mergekit_yaml = str(Path(sys.executable).parent / "mergekit-yaml")
    rows: list[tuple[str, ...]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="merge-speed-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        model_bytes = make_family(root, args.layers)
        print(f"family written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        for name in chosen:
            paths = []
            for which in (0, 1):
                config = method_config(root, name, which)
                if isinstance(config, str):
                    break
                paths.append(root / f"{name}-{'ab'[which]}.yml")
                paths[-1].write_text(yaml.safe_dump(config, sort_keys=False))
            if len(paths) < 2:
                skipped.append(f"{name}: skipped, {config}")
                print(skipped[-1], file=sys.stderr)
                continue
            ours = run_child("ours", paths, args.repeats, args.slow, args.threads)
            print(f"{name}: ours {ours}", file=sys.stderr)
            mk = run_child("mergekit", paths, args.mergekit_repeats, args.slow, args.threads) \
                if "error" not in ours and args.mergekit_repeats > 0 else None
            print(f"{name}: mergekit {mk}", file=sys.stderr)
            rows += method_rows(name, ours, mk, model_bytes)

        for name in end_to_end:
            config_path = root / f"{name}-a.yml"
            if not config_path.exists():
                config = method_config(root, name, 0)
                if isinstance(config, str):
                    skipped.append(f"end to end {name}: skipped, {config}")
                    continue
                config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            runs: dict[str, list] = {"search merge": [], "mergekit-yaml": []}
            for _ in range(args.end_to_end_repeats):
                for tool, command in (("search merge", [sys.executable, "-m", "search.cli", "merge"]),
                                      ("mergekit-yaml", [mergekit_yaml])):
                    out = root / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    settle_page_cache(root)
                    runs[tool].append(timed_process([*command, str(config_path), str(out), "--random-seed", "0"]))
                    print(f"end to end {name} {tool}: {runs[tool][-1]}", file=sys.stderr)
            shutil.rmtree(root / "out", ignore_errors=True)
            (ours_s, ours_rss, ours_err), (mk_s, mk_rss, mk_err) = (median_run(runs["search merge"]),
                                                                    median_run(runs["mergekit-yaml"]))
            inputs = len(yaml.safe_load(config_path.read_text()).get("models") or [0, 0])
            label = f"{name} e2e ({inputs} in)"
            if ours_err or mk_err:
                rows.append((label, "search merge / mergekit-yaml", "failed: " + (ours_err or mk_err)[:80], "", "", ""))
                continue
            speedup = mk_s / ours_s
            rows.append((label, "wall: search merge / mergekit-yaml", f"{ours_s:.1f} s / {mk_s:.1f} s",
                         f"{speedup:.1f}x faster", ">= 3x", verdict(speedup >= 3)))
            rows.append((label, "peak RSS: search merge / mergekit-yaml",
                         f"{ours_rss / GIB:.2f} / {mk_rss / GIB:.2f} GiB", f"{ours_rss / mk_rss:.2f}x", "< 1x",
                         verdict(ours_rss < mk_rss)))

    print(f"phi-2-shaped family (base + 3 fine-tune-like children), {args.layers} layers, float16, one model "
          f"{model_bytes / GIB:.2f} GiB; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; ours: median of {args.repeats} builds, mergekit: median of "
          f"{args.mergekit_repeats}")
    print_table(rows)
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
