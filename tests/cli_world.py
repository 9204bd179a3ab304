"""A small world for command-line tests: a tiny model folder, a text corpus, a saved SAE, a
finished training run with two checkpoints and an activation cache, all built in seconds.

Importable from any test folder (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit import SAE
from saekit.cli import main
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

HOOK = "blocks.0.hook_resid_pre"
#: Settings of a tiny run on the tiny model: 1,024 tokens in batches of 256, seconds on a CPU.
TINY_RUN = (
    "--context-size 64 --tokens 1024 --batch-size 256 --eval-tokens 256 --expansion-factor 2 "
    "--k 8 --checkpoint-every 512 --no-report --no-progress -q"
)


@dataclass
class World:
    root: Path
    model: Path
    """A random-weight GPT-2 folder (2 layers, d_model 32, 128 positions) with its tokenizer."""
    corpus: Path
    """400 lines of text, one document a line."""
    sae: Path
    """A topk SAE (d_in 32, 64 latents) on HOOK of `model`."""
    run: Path
    """A finished `saekit train` run on `model` and `corpus`, checkpoints at 512 and 1,024."""
    cache: Path
    """A finished activation cache of 1,024 rows at HOOK."""

    def train_args(self, out: Path) -> list[str]:
        return [
            "train", "--model", str(self.model), "--dataset", str(self.corpus),
            "--out", str(out), *TINY_RUN.split(),
        ]


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    words = " ".join(TINY_TEXTS).split()
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(lines)))
    return path


def build_world(root: Path) -> World:
    from saekit.data.cache import write_activation_cache
    from saekit.models import load_model

    model = root / "model"
    tiny_gpt2(300).save_pretrained(model)
    tiny_tokenizer(300).save_pretrained(model)
    corpus = write_corpus(root / "corpus.txt")
    torch.manual_seed(0)
    sae = SAE.create(
        "topk", 32, 64, k=4,
        metadata={"model_name": str(model), "hook_name": HOOK, "context_size": 64},
    ).save(root / "sae")
    world = World(root, model, corpus, sae, root / "run", root / "cache")
    assert main(world.train_args(world.run)) == 0
    write_activation_cache(
        load_model(model), HOOK, str(corpus), world.cache, 1024, context_size=64,
        shard_rows=512, model_name=str(model), progress=False,
    )
    return world


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256 of its bytes ("dir" for folders)} of everything under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
