"""Activation-store overhead and activation-cache read throughput.

    .venv/bin/python benchmarks/bench_activation_store.py [--tokens 65536] [--cache-mb 512]

1. Store overhead: the time to serve N tokens of activations through `ActivationStore`,
   against the time of the bare forward passes over the same token windows (the model's
   own cost). Overhead = (store - forward) / store; the goal is under 10%. Uses the bundled
   model when it is installed, else a random GPT-2 of similar size.
2. Cache reading: writes a cache of about --cache-mb MB, then reads it twice with
   `CachedActivations` (the second read is from the page cache) and reports GB/s and the
   peak resident memory growth against the configured buffer.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import torch

from saekit.data import ActivationStore, TokenWindows
from saekit.data.cache import CachedActivations, write_activation_cache
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer


def texts(n: int) -> list[str]:
    if importlib.util.find_spec("saekit.assets.corpus"):
        from saekit.assets.corpus import train_texts

        return list(train_texts())[:n]
    return [TINY_TEXTS[i % len(TINY_TEXTS)] for i in range(n)]


def model_for_bench() -> tuple[object, str]:
    if importlib.util.find_spec("saekit.models.bundled"):
        try:
            return load_model("bundled"), "bundled"
        except Exception as err:  # noqa: BLE001 - fall back and say why
            print(f"bundled model unavailable ({err}); using a random GPT-2")
    return load_model(tiny_gpt2(300, n_layer=4, d_model=256), tokenizer=tiny_tokenizer()), (
        "random GPT-2 4x256"
    )


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_store(n_tokens: int, context_size: int, model_batch_size: int) -> None:
    model, label = model_for_bench()
    hook = "blocks.1.hook_resid_post"
    docs = texts(20000)
    n_windows = n_tokens // context_size

    def windows() -> TokenWindows:
        return TokenWindows(docs, model.tokenizer, context_size)

    # Tokenize once up front (as `saekit pretokenize` does): both timings then exclude it.
    source = windows()
    batches = [b for b in iter(lambda: source.batch(model_batch_size), None)][
        : max(1, n_windows // model_batch_size)
    ]
    pretokenized = datasets.Dataset.from_dict({"input_ids": torch.cat(batches).tolist()})
    n_windows = sum(b.shape[0] for b in batches)
    model.activations(batches[0], [hook])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        model.activations(batch, [hook])
    forward = time.perf_counter() - start

    store = ActivationStore(model, hook, pretokenized, context_size=context_size,
                            batch_size=4096, buffer_size=4096 * 4,
                            model_batch_size=model_batch_size)
    start = time.perf_counter()
    rows = sum(batch.shape[0] for batch in store)
    served = time.perf_counter() - start
    forward_share = forward
    read = n_windows
    print(f"store [{label}, {hook}, context {context_size}, {model_batch_size} seq/pass]")
    print(f"  bare forward passes: {forward_share:.2f} s for {read} windows")
    print(f"  store: {served:.2f} s, {rows} rows served ({rows / served:,.0f} tokens/s)")
    print(f"  overhead: {100 * (served - forward_share) / served:.1f}% of the store's time")


def bench_cache(cache_mb: int, d_model: int) -> None:
    model = load_model(tiny_gpt2(300, n_layer=1, d_model=d_model), tokenizer=tiny_tokenizer())
    rows = cache_mb * 2**20 // (4 * d_model)
    folder = Path(tempfile.mkdtemp()) / "cache"
    try:
        start = time.perf_counter()
        write_activation_cache(model, "blocks.0.hook_resid_post", texts(20000) * 50, folder,
                               rows, context_size=128, model_batch_size=16, shard_rows=32768)
        written = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.glob("shard_*"))
        print(f"cache: wrote {size / 1e9:.2f} GB ({rows} rows x {d_model}) in {written:.1f} s")
        probe = torch.randn(32768, d_model)
        start = time.perf_counter()
        for _ in range(5):
            probe.clone()
        copy_speed = 5 * probe.numel() * 4 / (time.perf_counter() - start) / 1e9
        print(f"  reference: one plain in-memory copy runs at {copy_speed:.2f} GB/s here")
        buffer_rows = 65536
        for attempt in ("first read", "page-cache read"):
            before = rss_mb()
            reader = CachedActivations(folder, batch_size=4096, buffer_size=buffer_rows)
            start = time.perf_counter()
            served = sum(batch.shape[0] for batch in reader)
            elapsed = time.perf_counter() - start
            print(f"  {attempt}: {served * d_model * 4 / elapsed / 1e9:.2f} GB/s, "
                  f"peak RSS growth {rss_mb() - before:.0f} MB (buffer {buffer_rows} rows = "
                  f"{buffer_rows * d_model * 4 / 2**20:.0f} MB, shard "
                  f"{32768 * d_model * 4 / 2**20:.0f} MB)")
    finally:
        shutil.rmtree(folder.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--model-batch-size", type=int, default=16)
    parser.add_argument("--cache-mb", type=int, default=512)
    parser.add_argument("--cache-d-model", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_store(args.tokens, args.context_size, args.model_batch_size)
    bench_cache(args.cache_mb, args.cache_d_model)


if __name__ == "__main__":
    main()
