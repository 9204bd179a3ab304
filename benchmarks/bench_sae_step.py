"""SAE training-step throughput per architecture and width, next to the matmul peak.

Everything is measured in one run, interleaved, so the ratios hold even on a shared machine:

    python benchmarks/bench_sae_step.py [--d-in 256] [--expansions 8 16] [--batch 4096]

For each architecture it prints tokens/s of a full step (forward, loss, backward, Adam), the
FLOP rate that implies (dense architectures: 6 matmul-equivalents of batch x d_in x d_sae per
step), the fraction of the measured matmul peak, and for topk the speed-up over standard.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from saekit import SAE, LossSettings

ARCHITECTURES = ("standard", "jumprelu", "gated", "topk", "topk_dense", "batchtopk")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def matmul_peak(batch: int, d_in: int, d_sae: int, repeats: int) -> float:
    """FLOP/s of the encoder-shaped matmul, the ceiling a dense SAE step can reach."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    seconds = timed(lambda: a @ b, repeats)
    return 2 * batch * d_in * d_sae / seconds


def step_fn(name: str, d_in: int, d_sae: int, k: int, batch: int) -> Callable[[], None]:
    architecture = "topk" if name == "topk_dense" else name
    fields = {"k": k} if "topk" in architecture else {}
    sae = SAE.create(architecture, d_in, d_sae, **fields)
    settings = LossSettings(sparsity_coefficient=1e-3, use_sparse_kernel=name != "topk_dense")
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sae.training_forward(x, settings=settings).loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--expansions", type=int, nargs="+", default=[16])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for expansion in args.expansions:
        d_sae = args.d_in * expansion
        peak = matmul_peak(args.batch, args.d_in, d_sae, args.repeats)
        print(
            f"\nd_in={args.d_in} d_sae={d_sae} batch={args.batch}: "
            f"matmul peak {peak / 1e9:.1f} GFLOP/s"
        )
        rates: dict[str, float] = {}
        for name in args.architectures:
            seconds = timed(step_fn(name, args.d_in, d_sae, args.k, args.batch), args.repeats)
            rates[name] = args.batch / seconds
            flops = 6 * 2 * args.batch * args.d_in * d_sae / seconds
            print(
                f"  {name:12s} {rates[name]:10.0f} tokens/s   "
                f"dense-equivalent {flops / 1e9:6.1f} GFLOP/s = {flops / peak:5.1%} of peak"
            )
        if "topk" in rates and "standard" in rates:
            print(f"  topk / standard tokens/s: {rates['topk'] / rates['standard']:.2f}x")
        if "topk" in rates and "topk_dense" in rates:
            print(f"  topk sparse kernel / dense: {rates['topk'] / rates['topk_dense']:.2f}x")


if __name__ == "__main__":
    main()
