"""Dashboard size and build time: statistics pass plus site, as `saekit dashboard` builds them.

    python benchmarks/bench_dashboard.py [--d-sae 4096 32768] [--sae /tmp/demo]
        [--tokens 32768] [--threads 2] [--left 24] [--right 8] [--keep DIR]

For each size: the time of the statistics pass (model + SAE over held-out text) and of
writing the site, and the bytes the folder holds per latent, split into statistics
(feature_stats.js + feature_stats/, which the site reads) and the rest of the site. "disk" is
what the files take on disk (whole blocks), "bytes" their lengths.

The text is the bundled corpus's held-out works, 128-token windows, batches of 16, as the
command reads them; the context kept is the command's unless --left/--right say otherwise
(24 before, 8 after). The SAE is the
one given by --sae (e.g. the trained demo SAE), else a freshly initialised top-k SAE (k = 64)
on blocks.2.hook_resid_pre of the bundled model. Without the bundled weights a random-weight
GPT-2 of the same shape reads random tokens instead (same cost, not the same sizes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saekit import SAE
from saekit.analysis.collect import feature_statistics
from saekit.analysis.dashboard import write_dashboard
from saekit.commands.dashboard import DEFAULT_LEFT, DEFAULT_RIGHT, hook_description
from saekit.models import load_model

HOOK = "blocks.2.hook_resid_pre"


def stand_in_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from saekit.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8192, n_layer=4, n_embd=256, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=1)
    return load_model(GPT2LMHeadModel(cfg).eval(), tokenizer=tiny_tokenizer(300)), "stand-in"


def token_batches(backend, name: str, n_tokens: int) -> list[torch.Tensor]:
    if name == "bundled":
        from saekit.evals.api import heldout_token_batches

        return list(heldout_token_batches(backend.tokenizer, n_tokens, context_size=128,
                                          batch_size=16))
    gen = torch.Generator().manual_seed(0)
    vocab = len(backend.tokenizer)
    return [torch.randint(3, vocab, (16, 128), generator=gen)
            for _ in range(max(1, n_tokens // (16 * 128)))]


def folder_size(folder: Path) -> dict[str, int]:
    """Bytes and disk use of the statistics files and of the rest of the site."""
    out = {"stats_bytes": 0, "site_bytes": 0, "stats_disk": 0, "site_disk": 0}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        part = "stats" if path.name == "feature_stats.js" or "feature_stats" in path.parts[
            len(folder.parts):-1] else "site"
        info = path.stat()
        out[f"{part}_bytes"] += info.st_size
        out[f"{part}_disk"] += info.st_blocks * 512
    return out


def run_one(backend, name: str, sae: SAE, label: str, args, keep: Path | None) -> str:
    batches = token_batches(backend, name, args.tokens)
    start = time.perf_counter()
    stats = feature_statistics(sae, backend, batches, left=args.left, right=args.right)
    mid = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = keep / label if keep else Path(tmp)
        if keep:
            shutil.rmtree(out, ignore_errors=True)
        write_dashboard(stats, backend.tokenizer, out, model_name=name,
                        hook_name=hook_description(sae), sae_name=label)
        end = time.perf_counter()
        size = folder_size(out)
    d = sae.cfg.d_sae
    total = size["stats_bytes"] + size["site_bytes"]
    disk = size["stats_disk"] + size["site_disk"]
    print(f"{label}: {d} latents, {stats.n_tokens} tokens, context {args.left} + "
          f"{args.right}, {args.threads} threads: statistics "
          f"{mid - start:.1f} s, site {end - mid:.1f} s, total {end - start:.1f} s; "
          f"{total / d:.0f} bytes/latent (statistics {size['stats_bytes'] / d:.0f}, rest of "
          f"the site {size['site_bytes'] / d:.0f}), {total / 1e6:.1f} MB; disk "
          f"{disk / d:.0f} bytes/latent; load average {os.getloadavg()[0]:.1f}", flush=True)
    return (f"| {label} | {d:,} | {mid - start:.0f} s | {end - mid:.0f} s | {end - start:.0f} s "
            f"| {total / d:,.0f} | {size['stats_bytes'] / d:,.0f} | {disk / d:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32_768)
    p.add_argument("--d-sae", type=int, nargs="*", default=[4096, 32_768])
    p.add_argument("--sae", default=None, help="a saved SAE to measure as well")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--left", type=int, default=DEFAULT_LEFT, help="context kept before")
    p.add_argument("--right", type=int, default=DEFAULT_RIGHT, help="context kept after")
    p.add_argument("--keep", default=None, help="write the sites under this folder and keep them")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        backend, name = load_model("bundled"), "bundled"
    except (FileNotFoundError, ValueError):  # weights not installed yet
        backend, name = stand_in_model()
    keep = Path(args.keep) if args.keep else None
    rows = []
    if args.sae:
        rows.append(run_one(backend, name, SAE.load(args.sae), Path(args.sae).name, args, keep))
    for d_sae in args.d_sae:
        torch.manual_seed(0)
        sae = SAE.create("topk", 256, d_sae, k=64)
        sae.cfg.metadata.hook_name = HOOK
        rows.append(run_one(backend, name, sae, f"fresh-topk-{d_sae}", args, keep))
    print("\n| SAE | latents | statistics | site | total | bytes/latent | of which statistics "
          "| disk/latent |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
