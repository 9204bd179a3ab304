"""One SAE trained in memory from an activation cache, for comparing dead-latent settings fast.

    .venv/bin/python benchmarks/dead_latent_variants.py CACHE --arch standard --target 32 \
        [--steps 1200] [--batch 1024] [--threads 1] [--tag NAME] [field=value ...]

CACHE is a `saekit cache` folder of the bundled model at `blocks.2.hook_resid_pre` (see
bench_dead_latents.py) holding at least 1,328,800 rows; of the first 1,328,800, 100,000
random rows are held out and never trained on; the SAE (16x) trains with the trainer
directly on the other rows, each `field=value` setting a TrainingSection field (JSON
values). Prints, and appends to CACHE/../variants.jsonl, the held-out L0, explained
variance and dead fraction (latents that never fire on the held-out rows) and the fraction
the trainer counted dead at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from saekit.saes.base import SAE
from saekit.saes.registry import architecture_class
from saekit.training.config import TrainingSection
from saekit.training.trainer import SAEJob, Trainer

TRAIN_ROWS = 1_228_800
HELD_OUT_ROWS = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--arch", default="standard")
    parser.add_argument("--target", type=float, default=32)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument("settings", nargs="*", help="TrainingSection field=value (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shards = sorted(args.cache.glob("shard_*.safetensors"))
    rows = torch.cat([next(iter(load_file(s).values())) for s in shards])
    rows = rows[:TRAIN_ROWS + HELD_OUT_ROWS]
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(123))
    train = rows[order[:TRAIN_ROWS]]
    held_out = rows[order[TRAIN_ROWS:TRAIN_ROWS + HELD_OUT_ROWS]]
    scale = train.shape[1] ** 0.5 / train[:200_000].norm(dim=1).mean().item()
    settings = {}
    for item in args.settings:
        key, value = item.split("=", 1)
        settings[key] = json.loads(value)
    cfg = TrainingSection(tokens=args.steps * args.batch, batch_size=args.batch,
                          target_l0=args.target, **settings)
    d_in = train.shape[1]
    k = {"k": int(args.target)} if architecture_class(args.arch).sparsity_control == "k" else {}
    sae = SAE.create(args.arch, d_in, 16 * d_in, **k)
    shuffle = torch.randperm(TRAIN_ROWS, generator=torch.Generator().manual_seed(0))

    def batches():
        step = 0
        while True:
            start = (step * args.batch) % TRAIN_ROWS
            step += 1
            yield train[shuffle[start:start + args.batch]]

    started = time.time()
    trainer = Trainer(SAEJob(sae, cfg, norm_scale=scale), batches())
    trained = trainer.fit().saes["sae"].eval()
    with torch.no_grad():
        fired = torch.zeros(trained.cfg.d_sae, dtype=torch.bool)
        squared_error = active = 0.0
        for chunk in held_out.split(10_000):
            latents = trained.encode(chunk)
            squared_error += (trained.decode(latents) - chunk).pow(2).sum().item()
            active += (latents != 0).sum().item()
            fired |= (latents != 0).any(dim=0)
        variance = (held_out - held_out.mean(0)).pow(2).sum().item()
    result = {
        "tag": args.tag, "arch": args.arch, "target": args.target, "settings": settings,
        "l0": active / len(held_out), "explained_variance": 1 - squared_error / variance,
        "dead_fraction": 1 - fired.float().mean().item(),
        "trainer_dead_fraction": float(trainer.states[0].dead_mask().float().mean()),
        "seconds": round(time.time() - started),
    }
    print(json.dumps(result))
    with (args.cache.parent / "variants.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
