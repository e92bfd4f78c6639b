"""Scoring speed: our engine against lm-eval's HF backend on the same model, items and metrics.

Two offline tasks written as lm-eval YAML over local JSON:
- hellaswag-like: 4 endings per item, a long 10-shot context drawn per item (lm-eval's default
  sampler, as hellaswag), metrics acc and acc_norm;
- gsm8k-like generate_until: a fixed 8-shot block of worked answers (fewshot sampler first_n, as
  lm-eval's gsm8k_cot and mmlu use), stop strings, regex filters, exact_match.

lm-eval is timed as one `lm_eval.evaluator.evaluate` call with an HFLM and the loaded tasks built
once (model and data loading excluded); ours as one `Suite.run` (+ `result()`) after one
`Suite.build`. Both use the same in-memory model object; the calls alternate, the best of each is
kept. The metrics of every call must be identical.

    python benchmarks/score_speed.py [--items 40] [--gen-items 48] [--candidates 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = (
    "the a man woman child dog cat bird car house tree river city road park kitchen garden table window door "
    "runs walks opens closes sees takes gives finds makes puts picks holds throws carries watches cleans "
    "red blue green small big old new quiet loud slowly quickly then after before while because and but with "
    "into onto under over near far from ball cup book box rope bike boat coat hat shoe stone leaf paper brush"
).split()


def sentence(rng: random.Random, n: int) -> str:
    """n random words, capitalised, with a full stop."""
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def hellaswag_docs(rng: random.Random, n: int) -> list[dict]:
    """Contexts of ~2 sentences and 4 endings of 1-2 sentences; label random."""
    return [
        {
            "query": f"{sentence(rng, 10)} {sentence(rng, 8)} Then the {rng.choice(WORDS)}",
            "choices": [f"{sentence(rng, rng.randint(8, 16))}" for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]


def gsm_docs(rng: random.Random, n: int) -> list[dict]:
    """Arithmetic word problems with a worked answer ending in '#### N'."""
    docs = []
    for _ in range(n):
        a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
        who, what = rng.choice(["Ann", "Bo", "Cy", "Dee"]), rng.choice(["apples", "stones", "cups", "books"])
        q = f"{who} has {a} {what} and finds {b} more, then gives away {c}. How many {what} are left?"
        answer = f"{who} has {a} + {b} = {a + b} {what}. After giving away {c}: {a + b} - {c} = {a + b - c}."
        docs.append({"question": q, "answer": f"{answer}\n#### {a + b - c}"})
    return docs


def write_tasks(folder: Path, n_items: int, n_gen: int, max_gen_toks: int) -> None:
    """JSON data and the two task YAMLs."""
    rng = random.Random(0)
    data = {
        "hs_train": hellaswag_docs(rng, 200),
        "hs_eval": hellaswag_docs(rng, n_items),
        "gsm_train": gsm_docs(rng, 16),
        "gsm_eval": gsm_docs(rng, n_gen),
    }
    for name, rows in data.items():
        (folder / f"{name}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    hs_files = json.dumps(
        {"data_files": {"train": str(folder / "hs_train.json"), "eval": str(folder / "hs_eval.json")}}
    )
    (folder / "bench_hellaswag.yaml").write_text(
        textwrap.dedent(f"""\
        task: bench_hellaswag
        dataset_path: json
        dataset_kwargs: {hs_files}
        output_type: multiple_choice
        training_split: train
        validation_split: eval
        doc_to_text: "{{{{query}}}}"
        doc_to_target: "{{{{label}}}}"
        doc_to_choice: "choices"
        num_fewshot: 10
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        """)
    )
    gsm_files = json.dumps(
        {"data_files": {"train": str(folder / "gsm_train.json"), "eval": str(folder / "gsm_eval.json")}}
    )
    (folder / "bench_gsm.yaml").write_text(
        textwrap.dedent(f"""\
        task: bench_gsm
        dataset_path: json
        dataset_kwargs: {gsm_files}
        output_type: generate_until
        training_split: train
        fewshot_split: train
        test_split: eval
        fewshot_config:
          sampler: first_n
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_target: "{{{{answer}}}}"
        num_fewshot: 8
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
        generation_kwargs:
          until: ["Question:", "</s>", "<|im_end|>"]
          do_sample: false
          temperature: 0.0
          max_gen_toks: {max_gen_toks}
        filter_list:
          - name: "strict-match"
            filter:
              - function: "regex"
                regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
              - function: "take_first"
        """)
    )


def build_model(folder: Path, hidden: int, layers: int):
    """A byte-level BPE tokenizer trained on the task texts and a random-weight Llama of the given size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [line for f in sorted(folder.glob("*.json")) for line in f.read_text().splitlines()]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def metric_values(results: dict, task: str) -> dict[str, float]:
    """lm-eval's metric values of a task, stderr entries left out."""
    return {k: float(v) for k, v in results["results"][task].items() if "," in k and "_stderr" not in k}


def main() -> None:
    """Build the assets, time both engines per candidate, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40, help="hellaswag-like items")
    parser.add_argument("--gen-items", type=int, default=48, help="gsm8k-like items")
    parser.add_argument("--max-gen-toks", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=3, help="timed calls per engine (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval logs a line per truncated or odd request

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from objectives import Suite, TaskSpec
    from objectives.tasks import quiet

    tmp = Path(tempfile.mkdtemp(prefix="score-speed-"))
    write_tasks(tmp, args.items, args.gen_items, args.max_gen_toks)
    model, tokenizer = build_model(tmp, args.hidden, args.layers)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: llama hidden {args.hidden}, {args.layers} layers, {params:.1f}M params, float32, cpu, "
        f"{args.threads} thread(s); batch size {args.batch_size}"
    )

    rows = []
    for task, n in (("bench_hellaswag", args.items), ("bench_gsm", args.gen_items)):
        # lm-eval: HFLM and tasks built once; each candidate is one evaluate() call
        t0 = time.perf_counter()
        with quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=2048)
            loaded = TaskManager(include_path=str(tmp), include_defaults=False).load([task])
        ref_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        suite = Suite.build([TaskSpec(task, subset="first")], tokenizer, [tmp], max_length=2048)
        our_setup = time.perf_counter() - t0
        ref_times, our_times, forward, ref, same = [], [], [], None, True
        for _ in range(args.candidates):  # alternate the engines so load changes hit both alike
            for t in loaded["tasks"].values():
                t.set_fewshot_seed(1234)  # as simple_evaluate does before every run
            t0 = time.perf_counter()
            with quiet():
                ref = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=False)
            ref_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run = suite.run(model, batch_size=args.batch_size)
            for _ in run:
                pass
            result = run.result()
            our_times.append(time.perf_counter() - t0)
            forward.append(run.forward_seconds)
            same = same and result.metrics[task] == metric_values(ref, task)
        best = min(range(args.candidates), key=our_times.__getitem__)
        rows.append(
            (
                task,
                n,
                ref_setup,
                min(ref_times),
                our_setup,
                our_times[best],
                forward[best],
                same,
                result.metrics[task],
            )
        )

    print()
    print(
        "| task | items | lm-eval setup s | lm-eval s/candidate | ours setup s | ours s/candidate "
        "| speed-up | ours: share outside forward | metrics identical |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for task, n, rs, rt, os_, ot, fw, same, metrics in rows:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(
            f"| {task} | {n} | {rs:.1f} | {rt:.2f} | {os_:.1f} | {ot:.2f} | {rt / ot:.1f}x "
            f"| {(ot - fw) / ot:.0%} | {'yes' if same else 'NO'} ({shown}) |"
        )
    if not all(r[7] for r in rows):
        raise SystemExit("metrics differ from lm-eval")


if __name__ == "__main__":
    main()
