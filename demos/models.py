"""Tiny fine-tunes of one tiny base, built on CPU in minutes, for the offline demo studies.

The first demo (`DemoRecipe`, studies/demo.yaml): the base learns to copy a short string of
letters or digits. Parent A learns to shift letters one step along the alphabet
("shift : c f k q = d g l r"), parent B learns to double digits mod 10
("double : 3 5 1 7 = 6 0 2 4"). Each parent may change only the early MLPs and late attention
(A) or the early attention and late MLPs (B), so a merge keeps both skills only if its
self_attn and mlp gradients run the opposite way to the classic hand-written SLERP gradient.

The second demo (`ThreeRecipe`, studies/demo3.yaml): a base that copies letters, digits and
capitals, and three children fine-tuned from it on ALL their modules (no module is reserved for a
skill): `shift` shifts letters, `double` doubles digits, `mirror` maps capitals to the other end of
the alphabet ("mirror : A C Z Y = Z X A B"). Their task vectors overlap in every tensor, which is
what a TIES/DARE merge of real fine-tunes of one base faces.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from merge_core.locks import exclusive_lock

ProgressCallback = Callable[[str, int, int], None]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
CAPITALS = LETTERS.upper()
SPECIALS = ["<pad>", "<unk>", "<eos>"]
VOCAB = SPECIALS + ["copy", "shift", "double", ":", "="] + list(LETTERS) + list(DIGITS)
VOCAB3 = VOCAB + ["mirror"] + list(CAPITALS)  # the second demo's models add a third symbol set
# skill name -> (symbols, rule); "copy" is what the base knows, the others are the parents' skills
SKILLS: dict[str, tuple[str, Callable[[str], str]]] = {
    "copy_letters": (LETTERS, lambda c: c),
    "copy_digits": (DIGITS, lambda c: c),
    "shift": (LETTERS, lambda c: LETTERS[(LETTERS.index(c) + 1) % 26]),
    "double": (DIGITS, lambda c: str(2 * int(c) % 10)),
    "copy_capitals": (CAPITALS, lambda c: c),
    "mirror": (CAPITALS, lambda c: CAPITALS[25 - CAPITALS.index(c)]),
}
TASKS = {"demo_letters": "shift", "demo_digits": "double", "demo_capitals": "mirror"}
DATA_SEED = 1234
ITEMS_PER_TASK = 400


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo models' weights; its hash names a finished build."""

    hidden: int = 64
    layers: int = 6
    heads: int = 4
    length: int = 4
    batch: int = 128
    base_steps: int = 100
    base_lr: float = 3e-3
    parent_steps: int = 60
    parent_lr: float = 1e-3
    replay: float = 0.25
    seed: int = 0
    # bump when the build code changes what it trains, so old builds are not reused
    version: int = 1

    def digest(self) -> str:
        """A short stable hash of the recipe."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def vocab(self) -> list[str]:
        """The tokenizer's words."""
        return VOCAB

    @property
    def base_skills(self) -> list[str]:
        """What the base is pretrained on."""
        return ["copy_letters", "copy_digits"]

    def children(self) -> dict[str, tuple[str, list[str] | None]]:
        """Child name -> (skill, the modules it may change; None: all)."""
        # A may touch only early MLPs and late attention, B the reverse: the classic gradient
        # (attention from A early and from B late, MLP the other way) then keeps neither skill
        return {"parent_a": ("shift", _parent_modules(self, "mlp", "self_attn")),
                "parent_b": ("double", _parent_modules(self, "self_attn", "mlp"))}


@dataclass(frozen=True)
class ThreeRecipe(DemoRecipe):
    """The second demo: a base copying three symbol sets, three children fine-tuned on all modules."""

    base_steps: int = 150  # three symbol sets to copy
    demo: str = "three"  # in the digest: never mistaken for a first-demo build

    @property
    def vocab(self) -> list[str]:
        """The tokenizer's words."""
        return VOCAB3

    @property
    def base_skills(self) -> list[str]:
        """What the base is pretrained on."""
        return ["copy_letters", "copy_digits", "copy_capitals"]

    def children(self) -> dict[str, tuple[str, list[str] | None]]:
        """Child name -> (skill, None: every module is fine-tuned)."""
        return {"shift": ("shift", None), "double": ("double", None), "mirror": ("mirror", None)}


def example(skill: str, rng: random.Random, length: int) -> tuple[str, str]:
    """One (prompt, answer) pair of a skill, e.g. ("shift : a b c d =", "b c d e")."""
    symbols, rule = SKILLS[skill]
    source = [rng.choice(symbols) for _ in range(length)]
    word = skill.split("_")[0]
    return f"{word} : {' '.join(source)} =", " ".join(rule(c) for c in source)


def task_items(task: str, n: int = ITEMS_PER_TASK, length: int = 4) -> list[dict]:
    """The multiple-choice items of a demo task; deterministic and independent of any model."""
    skill = TASKS[task]
    symbols = SKILLS[skill][0]
    rng = random.Random(f"{DATA_SEED}-{task}")
    items, seen = [], set()
    while len(items) < n:
        prompt, answer = example(skill, rng, length)
        if prompt in seen:
            continue
        seen.add(prompt)
        # each wrong choice differs from the answer in one symbol, so a choice is won symbol by symbol
        choices = {answer}
        while len(choices) < 4:
            wrong = answer.split()
            pos = rng.randrange(length)
            wrong[pos] = rng.choice([s for s in symbols if s != wrong[pos]])
            choices.add(" ".join(wrong))
        choices = sorted(choices)
        items.append({"query": prompt, "choices": choices, "label": choices.index(answer)})
    return items


def write_task_data(data_dir: Path) -> dict[str, Path]:
    """Write one JSONL file per demo task into data_dir; returns task name -> file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in TASKS:
        path = data_dir / f"{task}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in task_items(task)))
        paths[task] = path
    return paths


def make_tokenizer(vocab: list[str] = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab` that splits on whitespace and punctuation."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<eos>",
        model_max_length=64,
    )


def _batch(skills: list[str], weights: list[float], rng: random.Random, recipe: DemoRecipe,
           held_out: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = [], []
    index = {w: i for i, w in enumerate(recipe.vocab)}
    while len(ids) < recipe.batch:
        prompt, answer = example(rng.choices(skills, weights)[0], rng, recipe.length)
        if prompt in held_out:
            continue
        p, a = [index[w] for w in prompt.split()], [index[w] for w in answer.split()]
        ids.append(p + a)
        # the prompt symbols are random, so only the answer carries a learnable signal
        labels.append([-100] * len(p) + a)
    return torch.tensor(ids), torch.tensor(labels)


def _train(model: PhiForCausalLM, trainable: list[str] | None, skills: list[str], weights: list[float],
           steps: int, lr: float, seed: int, recipe: DemoRecipe, held_out: set[str],
           report: Callable[[int], None]) -> None:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or any(t in name for t in trainable))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        ids, labels = _batch(skills, weights, rng, recipe, held_out)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        report(step + 1)
    model.eval()


def _parent_modules(recipe: DemoRecipe, early: str, late: str) -> list[str]:
    half = recipe.layers // 2
    return [f"layers.{i}.{early}." for i in range(half)] + [
        f"layers.{i}.{late}." for i in range(half, recipe.layers)
    ]


def _save(model: PhiForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    # save_pretrained draws its own tqdm bar; the caller owns the progress display
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _build(recipe: DemoRecipe, paths: dict[str, Path], progress: ProgressCallback | None) -> None:
    children = recipe.children()
    total = recipe.base_steps + len(children) * recipe.parent_steps
    offset = 0

    def report(stage: str) -> Callable[[int], None]:
        start = offset
        return lambda step: progress(stage, start + step, total) if progress else None

    # the models never see an evaluation prompt, so a task score measures the skill, not memory
    held_out = {item["query"] for task in TASKS for item in task_items(task, length=recipe.length)}
    tokenizer = make_tokenizer(recipe.vocab)
    config = PhiConfig(
        vocab_size=len(recipe.vocab), hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, max_position_embeddings=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, partial_rotary_factor=0.5,
        pad_token_id=0, bos_token_id=2, eos_token_id=2,
    )
    torch.manual_seed(recipe.seed)
    model = PhiForCausalLM(config)
    _train(model, None, recipe.base_skills, [1] * len(recipe.base_skills), recipe.base_steps, recipe.base_lr,
           recipe.seed, recipe, held_out, report("pretraining base"))
    offset += recipe.base_steps
    _save(model, tokenizer, paths["base"])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    r, copies = recipe.replay, recipe.base_skills
    for i, (name, (skill, trainable)) in enumerate(children.items()):
        model.load_state_dict(base_state)
        # replaying the base's copying keeps each parent's change inert outside its own skill
        _train(model, trainable, [skill, *copies], [1 - r] + [r / len(copies)] * len(copies),
               recipe.parent_steps, recipe.parent_lr, recipe.seed + 1 + i, recipe, held_out,
               report(f"fine-tuning {name} on {skill}"))
        offset += recipe.parent_steps
        _save(model, tokenizer, paths[name])


def build_demo_models(out_dir: Path, progress: ProgressCallback | None = None,
                      recipe: DemoRecipe | None = None) -> dict[str, Path]:
    """Build (or reuse) a demo base and its children; returns {"base", <child>...} -> folder.

    The default recipe is the first demo's (children parent_a, parent_b); ThreeRecipe() builds the
    second demo's (shift, double, mirror).
    progress(stage, done, total) is called after every training step. Safe when several processes
    ask at once: one builds under a file lock into a staging folder renamed into place when complete;
    the others wait for the lock and reuse its build. A killed build leaves only its staging folder.
    """
    recipe = recipe or DemoRecipe()
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in ("base", *recipe.children())}
    if _is_built(out_dir, recipe):
        return paths
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if _is_built(out_dir, recipe):  # another process built it while this one waited
            return paths
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        threads = torch.get_num_threads()
        # ops this small gain nothing from threads, and on a busy CPU two threads spin-wait 10x slower;
        # one thread also keeps the float sums in one order whatever the machine's core count
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng():
                _build(recipe, {name: staging / name for name in paths}, progress)
            (staging / "BUILD").write_text(recipe.digest() + "\n")
            if out_dir.exists():
                out_dir.rename(old)
            staging.rename(out_dir)
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return paths


def _is_built(out_dir: Path, recipe: DemoRecipe) -> bool:
    marker = out_dir / "BUILD"
    return (marker.is_file() and marker.read_text().strip() == recipe.digest()
            and all((out_dir / name / "model.safetensors").is_file() for name in ("base", *recipe.children())))


if __name__ == "__main__":
    # regenerates the committed task data: python -m demos.models studies/demo/data
    import sys

    for written in write_task_data(Path(sys.argv[1] if len(sys.argv) > 1 else "studies/demo/data")).values():
        print(written)
