"""Where a study's merger process holds its memory: VmRSS after each set-up step, then peak over builds.

    .venv/bin/python benchmarks/merger_rss.py CANDIDATE_A.yml CANDIDATE_B.yml [--builds 4]

Two candidate configs of the same merge (merge_speed.py writes such pairs); prints RSS (MiB; anon
and file-backed) after importing torch, transformers and merge_core, after `Merger` (inputs mapped,
`prepare` run), after `new_model()`, and the peak (VmHWM) and time of each build, alternating A and B.
"""

from __future__ import annotations

import argparse
import time


def rss() -> str:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) // 1024
    return (f"rss {fields['VmRSS']} MiB (anon {fields['RssAnon']}, file {fields['RssFile']}), "
            f"peak {fields['VmHWM']} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs=2)
    parser.add_argument("--builds", type=int, default=4)
    args = parser.parse_args()
    print("start", rss())
    import torch  # noqa: F401

    print("import torch", rss())
    import transformers  # noqa: F401

    print("import transformers", rss())
    from merge_core.config import load_config
    from merge_core.merger import MergePlan, Merger

    print("import merge_core", rss())
    candidates = [load_config(path) for path in args.configs]
    merger = Merger(MergePlan(candidates[0]), seed=0, skip_unchanged=False)
    print("Merger (prepare)", rss())
    model = merger.new_model()
    print("new_model()", rss())
    for i in range(args.builds):
        start = time.perf_counter()
        merger.build_into(model, candidates[(i + 1) % 2])
        print(f"build {i + 1} ({time.perf_counter() - start:.2f} s)", rss())


if __name__ == "__main__":
    main()
