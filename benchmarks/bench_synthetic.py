"""Recovery of known features by each built-in architecture, with an oracle and a random SAE
as the ceiling and the floor.

    .venv/bin/python benchmarks/bench_synthetic.py [--d 128] [--features 128] [--d-sae 256]
        [--tokens 1000000] [--batch 1024] [--architectures standard,gated,...] [--threads 1]
        [--seed 0] [--json PATH]

Synthetic data: `--features` orthogonal unit directions in d dimensions, Zipfian firing
(firing_max 0.25, exponent 0.5), uniform magnitudes in [0.5, 1.5], no noise. Every
architecture trains side by side on the same stream (`saekit.training.synthetic.run_synthetic`,
the usual trainer, target L0 = the expected number of firing features), then all are scored
on the same 20,000 held-out samples. The oracle's decoder is the true directions; the random
SAE is a freshly initialised topk SAE of the same width. Prints one JSON line per SAE and a
table; `--json` also writes the lines to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saekit import SAE
from saekit.evals.ground_truth import (
    SyntheticConfig,
    oracle_sae,
    recovery_scores,
)
from saekit.evals.synthetic import SyntheticFeatures
from saekit.training.synthetic import run_synthetic

ARCHITECTURES = "standard,gated,jumprelu,topk,batchtopk,matryoshka_batchtopk"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--architectures", default=ARCHITECTURES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    features = SyntheticFeatures(d=args.d, n_features=args.features, directions="orthogonal",
                                 seed=args.seed)
    config = SyntheticConfig(
        features=features, architectures=args.architectures.split(","), d_sae=args.d_sae,
        training_tokens=args.tokens, batch_size=args.batch, seed=args.seed,
    )
    started = time.time()
    run = run_synthetic(config)
    seconds = time.time() - started
    sampler = run.sampler
    eval_seed = 2 * args.seed + 1  # the held-out samples run_synthetic scored on
    torch.manual_seed(args.seed)
    references = {
        "oracle": oracle_sae(sampler),
        "random": SAE.create("topk", args.d, args.d_sae, k=max(1, round(sampler.expected_l0))),
    }
    scores = {
        name: recovery_scores(sae, sampler, config.eval_samples, eval_seed)
        for name, sae in references.items()
    }
    scores.update(run.scores)
    lines = []
    for name, s in scores.items():
        record = {
            "sae": name, "mcc": s.mcc, "f1": s.f1, "uniqueness": s.uniqueness,
            "duplicated_features": s.duplicated_features, "l2_ratio": s.l2_ratio,
            "l0": s.l0, "true_l0": s.true_l0, "explained_variance": s.explained_variance,
            "frac_alive": s.frac_alive, "d": args.d, "n_features": args.features,
            "d_sae": args.d_sae, "tokens": args.tokens, "batch": args.batch,
            "seed": args.seed, "train_seconds_all": round(seconds),
        }
        lines.append(json.dumps(record))
        print(lines[-1])
    print("\n| SAE | MCC | F1 | uniqueness | shrinkage (l2_ratio) | L0 | EV |")
    print("|---|---|---|---|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {s.mcc:.3f} | {s.f1:.3f} | {s.uniqueness:.3f} | {s.l2_ratio:.3f} | "
              f"{s.l0:.2f} | {s.explained_variance:.3f} |")
    if args.json is not None:
        args.json.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
