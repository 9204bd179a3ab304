"""Time to build a whole dashboard: statistics pass plus site, for a 4096-latent SAE.

    python benchmarks/bench_dashboard.py [--tokens 32768] [--d-sae 4096] [--threads 2]

Uses the bundled model when it is installed, otherwise a random-weight GPT-2 of the same
shape (4 layers, d_model 256, vocabulary 8192, context 128), which costs the same to run.
The SAE is a random top-k SAE (k = 32), so every latent has examples to show.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from saekit import SAE
from saekit.analysis.collect import feature_statistics
from saekit.analysis.dashboard import write_dashboard
from saekit.models import load_model


def stand_in_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from saekit.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8192, n_layer=4, n_embd=256, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=1)
    return load_model(GPT2LMHeadModel(cfg).eval(), tokenizer=tiny_tokenizer(300)), "stand-in"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=32_768)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        backend, name = load_model("bundled"), "bundled"
    except (FileNotFoundError, ValueError):  # weights not installed yet
        backend, name = stand_in_model()
    d_model = int(backend.activations(torch.zeros(1, 2, dtype=torch.long),
                                      ["blocks.2.hook_resid_pre"])["blocks.2.hook_resid_pre"]
                  .shape[-1])
    sae = SAE.create("topk", d_model, args.d_sae, k=32)
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    vocab = len(backend.tokenizer)
    gen = torch.Generator().manual_seed(0)
    n_batches = max(1, args.tokens // (16 * 128))
    batches = [torch.randint(3, vocab, (16, 128), generator=gen) for _ in range(n_batches)]
    start = time.perf_counter()
    stats = feature_statistics(sae, backend, batches)
    mid = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        write_dashboard(stats, backend.tokenizer, out)
        end = time.perf_counter()
    print(f"model {name}, {args.d_sae} latents, {n_batches * 16 * 128} tokens, "
          f"{args.threads} threads: statistics {mid - start:.1f} s, site {end - mid:.1f} s, "
          f"total {end - start:.1f} s")


if __name__ == "__main__":
    main()
