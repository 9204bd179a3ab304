"""End-to-end SAE training throughput on the bundled model, and where the time goes.

    .venv/bin/python benchmarks/bench_end_to_end.py [--tokens 204800] [--architectures topk]

Builds what `saekit.train` builds (the model backend, an `ActivationStore` with the run's
buffer size, the SAE, a `Trainer`) but without the final evaluation or checkpoints, and times
the training loop, split into:

- tokenize: turning corpus text into token windows (`TokenWindows.batch`, inside the store);
- model forward: the backend's forward passes up to the hook (`backend.activations`);
- store: the rest of the store's time (dropping special-token rows, filling, shuffling and
  gathering the buffer);
- SAE step: everything the trainer does with a batch (forward, loss, backward, clipping, Adam,
  decoder-norm upkeep, dead-latent tracking).

The norm-scaling estimate (the store reads 20 batches before training) is timed apart, as
setup. Tokens/s counts training tokens (rows the SAE trained on) over the loop's wall time.
When the bundled model's weights are missing, a random-weight GPT-2 of the same shape (with the
bundled tokenizer) stands in: the speed is the same, the activations are not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from saekit import SAE
from saekit.assets.corpus import train_texts
from saekit.data import ActivationStore
from saekit.models import load_model
from saekit.models.backend import ModelBackend
from saekit.training.config import TrainingSection
from saekit.training.run import NORM_ESTIMATE_BATCHES
from saekit.training.trainer import SAEJob, Trainer


class Clock:
    """Accumulates the wall time of the calls it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


class TimedStream:
    """The store as the trainer's iterator, timing each `next` (store + forward + tokenize)."""

    def __init__(self, store: Iterator[Any], clock: Clock) -> None:
        self._next = clock.wrap(store.__next__)

    def __iter__(self) -> TimedStream:
        return self

    def __next__(self) -> Any:
        return self._next()


def bundled_or_stand_in(model_dir: Path | None) -> tuple[ModelBackend, str]:
    """The bundled model (or the given folder); a random GPT-2 of its shape if it is missing."""
    from saekit.models.bundled import BUNDLED_MODEL_DIR

    if model_dir is not None:
        return load_model(str(model_dir), device="cpu"), str(model_dir)
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return load_model("bundled", device="cpu"), "bundled"
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tokenizer_only(BUNDLED_MODEL_DIR)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=256, n_layer=4,
                        n_head=4, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    folder = Path(tempfile.mkdtemp(prefix="saekit_standin_"))
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu"), "random GPT-2 4x256 (bundled weights missing)"


def _tokenizer_only(folder: Path) -> Any:
    # The bundled loader insists on config.json; the tokenizer files alone are enough here.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def run_one(
    backend: ModelBackend,
    hook: str,
    architecture: str,
    model_batch_size: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    tokenize, forward, stream = Clock(), Clock(), Clock()
    original = backend.activations
    backend.activations = forward.wrap(original)  # type: ignore[method-assign]
    try:
        store = ActivationStore(
            backend, hook, train_texts(), context_size=args.context,
            batch_size=args.batch_size, buffer_size=max(args.batch_size * 8, 16_384),
            model_batch_size=model_batch_size, seed=0, device="cpu",
        )
        store.windows.batch = tokenize.wrap(store.windows.batch)  # type: ignore[method-assign]
        d_in = int(store.d_in)  # type: ignore[arg-type]
        start = time.perf_counter()
        norm_scale = float(store.estimate_norm_scaling_factor(NORM_ESTIMATE_BATCHES))
        setup = time.perf_counter() - start
        for clock in (tokenize, forward):
            clock.seconds, clock.calls = 0.0, 0
        fields = {"k": args.k} if architecture == "topk" else {}
        torch.manual_seed(0)
        sae = SAE.create(architecture, d_in, args.expansion * d_in, **fields)
        cfg = TrainingSection(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                             sparsity_coefficient=args.l1_coefficient)
        trainer = Trainer(SAEJob(sae, cfg, hook=hook, norm_scale=norm_scale),
                          TimedStream(store, stream))
        start = time.perf_counter()
        result = trainer.fit()
        loop = time.perf_counter() - start
    finally:
        backend.activations = original  # type: ignore[method-assign]
    sae_step = loop - stream.seconds
    store_rest = stream.seconds - forward.seconds - tokenize.seconds
    return {
        "tokens": result.tokens, "loop": loop, "setup": setup, "tokenize": tokenize.seconds,
        "forward": forward.seconds, "store": store_rest, "sae_step": sae_step,
        "forward_rows": forward.calls * store.model_batch_size * args.context,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=204_800)
    parser.add_argument("--architectures", nargs="+", default=["topk", "standard"])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--l1-coefficient", type=float, default=5.0)
    parser.add_argument("--hook", default="blocks.2.hook_resid_pre")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--model-batch-sizes", type=int, nargs="+", default=[32],
                        help="sequences per model forward pass (the store's model_batch_size); "
                        "several are run one after another, for a side-by-side comparison")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a GPT-2 folder with tokenizer (default: the bundled model)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, label = bundled_or_stand_in(args.model_dir)
    print(f"model: {label}; hook {args.hook}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size}, {args.tokens} tokens")
    runs = [(a, m) for a in args.architectures for m in args.model_batch_sizes]
    for architecture, model_batch_size in runs:
        r = run_one(backend, args.hook, architecture, model_batch_size, args)
        parts = {"tokenize": r["tokenize"], "model forward": r["forward"],
                 "store (mask, buffer, shuffle)": r["store"], "SAE step": r["sae_step"]}
        width = args.expansion
        name = f"{architecture} {width}x" + (f" k={args.k}" if architecture == "topk" else "")
        name += f", {model_batch_size} sequences per forward"
        print(f"\n{name}: {r['tokens'] / r['loop']:,.0f} training tokens/s end to end "
              f"({r['tokens']} tokens in {r['loop']:.1f} s; setup/norm estimate "
              f"{r['setup']:.1f} s apart)")
        for part, seconds in parts.items():
            print(f"  {part:30s} {seconds:7.1f} s  {seconds / r['loop']:6.1%}")
        print(f"  model forward alone: {r['forward_rows'] / max(r['forward'], 1e-9):,.0f} "
              f"tokens/s over {r['forward_rows']} window tokens (the store reads ahead); "
              f"SAE step alone: {r['tokens'] / max(r['sae_step'], 1e-9):,.0f} tokens/s")


if __name__ == "__main__":
    main()
