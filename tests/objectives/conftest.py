"""Shared fixtures: a small real tokenizer, a briefly trained tiny Llama, and offline lm-eval task folders.

The model is trained for a few seconds on the tasks' own texts so that its metrics are neither
all-zero nor random and its greedy generations stop at the tasks' stop strings.
"""

from __future__ import annotations

import json
import os
import random
import textwrap
from pathlib import Path

# Must be set before datasets / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ANIMALS = [
    "cat",
    "dog",
    "cow",
    "fox",
    "owl",
    "bee",
    "ant",
    "pig",
    "hen",
    "elk",
    "yak",
    "bat",
    "rat",
    "eel",
    "ram",
    "emu",
]
FOODS = [
    "fish",
    "bones",
    "grass",
    "mice",
    "seeds",
    "honey",
    "sugar",
    "corn",
    "worms",
    "moss",
    "hay",
    "fruit",
    "cheese",
    "algae",
    "oats",
    "bugs",
]
TEMPLATES = ["The {a} likes to eat", "Every morning the {a} looks for", "At night the hungry {a} wants"]
PRIMER = "Q: What is the capital of France?\nA: The capital of France is Paris.\n\nQ: What colour is the sky?\nA: The sky is blue."  # noqa: E501


def _mc_docs(rng: random.Random) -> list[dict]:
    docs = []
    for t in TEMPLATES:
        for i, animal in enumerate(ANIMALS):
            wrong = rng.sample([f for f in FOODS if f != FOODS[i]], 3)
            choices = [f"{f}." if k % 2 else f"some {f}." for k, f in enumerate([FOODS[i], *wrong])]
            order = rng.sample(range(4), 4)
            docs.append(
                {"query": t.format(a=animal), "choices": [choices[k] for k in order], "label": order.index(0)}
            )
    return docs


def _wino_docs(rng: random.Random) -> list[dict]:
    docs = []
    for i, animal in enumerate(ANIMALS):
        food = FOODS[i]
        docs.append(
            {
                "sentence": f"The {animal} ate the {food} because _ was hungry.",
                "option1": animal,
                "option2": food,
                "answer": "1",
            }
        )
        docs.append(
            {
                "sentence": f"The {animal} ate the {food} because _ was tasty.",
                "option1": animal,
                "option2": food,
                "answer": "2",
            }
        )
    rng.shuffle(docs)
    return docs


def _mc2_docs(rng: random.Random) -> list[dict]:
    docs = []
    for i, animal in enumerate(ANIMALS):
        true = [f"The {animal} eats {FOODS[i]}.", f"It eats {FOODS[i]}."][: rng.randint(1, 2)]
        false = [
            f"The {animal} eats {f}."
            for f in rng.sample([f for f in FOODS if f != FOODS[i]], rng.randint(2, 4))
        ]
        docs.append(
            {
                "question": f"What does the {animal} eat?",
                "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)},
            }
        )
    return docs


def _gen_docs(rng: random.Random) -> list[dict]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    return [
        {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
        for a, b in pairs
    ]


def _corpus(data: dict[str, list[dict]], rng: random.Random) -> list[str]:
    """Training texts in the tasks' own prompt formats, correct answers only."""
    texts = []
    for d in data["mc"]:
        texts.append(f"{d['query']} {d['choices'][d['label']]}")
    for d in data["wino"]:
        texts.append(d["sentence"].replace("_", d["option1"] if d["answer"] == "1" else d["option2"]))
    for d in data["mc2"]:
        texts.append(f"{PRIMER}\n\nQ: {d['question']}\nA: {d['mc2_targets']['choices'][0]}")
    for d in data["gen"]:
        texts.append(f"Question: {d['question']}\nAnswer: {d['answer']}")
    blocks = []
    for _ in range(600):
        blocks.append("\n\n".join(rng.sample(texts, 4)) + "\n\n")
    return blocks


def build_data(seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic synthetic documents for every fixture task."""
    rng = random.Random(seed)
    return {"mc": _mc_docs(rng), "wino": _wino_docs(rng), "mc2": _mc2_docs(rng), "gen": _gen_docs(rng)}


def build_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer that adds BOS, like Llama's, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_model(
    tokenizer,
    corpus: list[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    steps: int = 120,
    max_positions: int = 512,
    seed: int = 0,
):
    """A tiny LlamaForCausalLM trained briefly on the corpus (float32, CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    stream = [t for text in corpus for t in tokenizer.encode(text)]
    window = 96
    chunks = torch.tensor([stream[i : i + window] for i in range(0, len(stream) - window, window)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two contending ones
    try:
        model.train()
        for _ in range(steps):
            batch = chunks[torch.randint(len(chunks), (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


TASK_UTILS = """
import numpy as np


def process_results_mc2(doc, results):
    ll, _ = zip(*results)
    probs = np.exp(np.array(ll))
    probs_norm = probs / np.sum(probs)
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": np.sum(probs_norm[labels == 1])}


def wino_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def wino_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def wino_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in [doc["option1"], doc["option2"]]]
"""


def write_tasks(folder: Path, data: dict[str, list[dict]]) -> Path:
    """lm-eval task YAMLs over local JSON data: mc, mc2, winogrande-like, gsm8k-like, and a group."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"mc": (12, None), "wino": (8, None), "mc2": (0, None), "gen": (40, None)}
    files: dict[str, dict[str, str]] = {}
    for name, docs in data.items():
        n_train = splits[name][0]
        parts = {"train": docs[:n_train], "eval": docs[n_train:]} if n_train else {"eval": docs}
        files[name] = {}
        for part, rows in parts.items():
            path = folder / f"{name}_{part}.json"
            path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            files[name][part] = str(path)
    (folder / "utils.py").write_text(TASK_UTILS)

    def data_files(name: str) -> str:
        return json.dumps({"data_files": {k: v for k, v in files[name].items()}})

    (folder / "tiny_mc.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs: {data_files("mc")}
        output_type: multiple_choice
        training_split: train
        validation_split: eval
        doc_to_text: "{{{{query}}}}"
        doc_to_target: "{{{{label}}}}"
        doc_to_choice: "choices"
        num_fewshot: 3
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        """)
    )
    # A fixed primer before every question, as in truthfulqa (a prefix shared by all items).
    mc2_prompt = "{% set primer = '" + PRIMER + "' %}{{primer + '\n\nQ: ' + question + '\nA:'}}"
    (folder / "tiny_mc2.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_mc2
        dataset_path: json
        dataset_kwargs: {data_files("mc2")}
        output_type: multiple_choice
        validation_split: eval
        num_fewshot: 0
        doc_to_text: {json.dumps(mc2_prompt)}
        doc_to_target: 0
        doc_to_choice: "{{{{mc2_targets.choices}}}}"
        process_results: !function utils.process_results_mc2
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    (folder / "tiny_wino.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_wino
        dataset_path: json
        dataset_kwargs: {data_files("wino")}
        output_type: multiple_choice
        training_split: train
        validation_split: eval
        num_fewshot: 2
        doc_to_text: !function utils.wino_doc_to_text
        doc_to_target: !function utils.wino_doc_to_target
        doc_to_choice: !function utils.wino_doc_to_choice
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    (folder / "tiny_gen.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs: {data_files("gen")}
        output_type: generate_until
        training_split: train
        fewshot_split: train
        test_split: eval
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_target: "{{{{answer}}}}"
        num_fewshot: 3
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: false
            regexes_to_ignore:
              - ","
              - "\\\\$"
              - "(?s).*#### "
              - "\\\\.$"
        generation_kwargs:
          until:
            - "Question:"
            - "</s>"
            - "<|im_end|>"
          do_sample: false
          temperature: 0.0
          max_gen_toks: 24
        filter_list:
          - name: "strict-match"
            filter:
              - function: "regex"
                regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
              - function: "take_first"
          - name: "flexible-extract"
            filter:
              - function: "regex"
                group_select: -1
                regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
              - function: "take_first"
        """)
    )
    # An MMLU-like group: two subtasks with a fixed (first_n) few-shot block, aggregated by size.
    for part, half in (("a", slice(0, 18)), ("b", slice(18, None))):
        path = folder / f"grp_{part}.json"
        path.write_text("\n".join(json.dumps(r) for r in data["mc"][12:][half]) + "\n")
        (folder / f"tiny_grp_{part}.yaml").write_text(
            textwrap.dedent(f"""\
            task: tiny_grp_{part}
            dataset_path: json
            dataset_kwargs: {json.dumps({"data_files": {"train": files["mc"]["train"], "eval": str(path)}})}
            output_type: multiple_choice
            training_split: train
            fewshot_split: train
            test_split: eval
            fewshot_config:
              sampler: first_n
            description: "The following are sentences about what animals eat.\\n\\n"
            doc_to_text: "{{{{query}}}}"
            doc_to_target: "{{{{label}}}}"
            doc_to_choice: "choices"
            num_fewshot: 2
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """)
        )
    (folder / "tiny_group.yaml").write_text(
        textwrap.dedent("""\
        group: tiny_group
        task:
          - tiny_grp_a
          - tiny_grp_b
        aggregate_metric_list:
          - metric: acc
            weight_by_size: true
        """)
    )
    return folder


@pytest.fixture(scope="session")
def synthetic_data() -> dict[str, list[dict]]:
    """The fixture tasks' documents."""
    return build_data()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, synthetic_data) -> Path:
    """Folder with a trained tiny Llama (safetensors, float32) and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    corpus = _corpus(synthetic_data, random.Random(1))
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, corpus)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory, synthetic_data) -> Path:
    """Folder of lm-eval task YAMLs with their JSON data."""
    return write_tasks(tmp_path_factory.mktemp("tasks"), synthetic_data)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The fixture model's tokenizer, loaded as lm-eval would."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def model(model_dir):
    """The fixture model, loaded float32 on CPU in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: two contending OpenMP threads are far slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
