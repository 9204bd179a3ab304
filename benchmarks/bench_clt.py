"""A cross-layer transcoder against per-layer transcoders on the bundled model.

Both train from the same activations (every layer's MLP input and output from one forward
pass per batch, the same seed and token budget) at the same L0 per layer: with `--rule topk`
(default) k per token and layer, the per-layer transcoders being one-layer top-k CLTs (which
are exactly transcoders); with `--rule jumprelu`, JumpReLU CLT and transcoders at the same
target L0 (the controller's L0 is approximate on short runs). Reported: training tokens per
second of each, and on held-out text each one's per-layer FVU, L0 and the replacement
model's CE/KL scores (every MLP replaced at once; the transcoders are spliced as a CLT
without cross-layer decoders).

    python benchmarks/bench_clt.py --tokens 40000 --target-l0 16 --d-sae 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from saekit import SAE
from saekit.data.tokens import TokenWindows, window_batches
from saekit.evals.crosslayer import evaluate_clt
from saekit.models import load_model
from saekit.saes.clt import clt_from_transcoders, clt_hooks, record_hooks
from saekit.training import SAEJob, Trainer, TrainingSection
from saekit.training.multisite import multisite_store, train_clt


class OneSite:
    """{hook: [batch, d]} batches as {hook: [batch, 1, d]}: what a one-layer CLT reads."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __iter__(self) -> OneSite:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {h: t.unsqueeze(1) for h, t in next(self.store).items()}


def clt_from_layers(layers: list[Any]) -> Any:
    """One-layer top-k CLTs, layer n's at index n, as one CLT without cross-layer decoders."""
    first = layers[0]
    n = len(layers)
    clt = SAE.create("clt", first.cfg.d_in, first.cfg.d_sae, n_layers=n, activation_fn="topk",
                     k=first.cfg.k)
    with torch.no_grad():
        for i, one in enumerate(layers):
            clt.W_enc[i] = one.W_enc[0]
            clt.b_enc[i] = one.b_enc[0]
            clt.b_dec[i] = one.b_dec[0]
            decoders = getattr(clt, f"W_dec_{i}")
            decoders.zero_()
            decoders[:, 0] = one.W_dec_0[:, 0]
    return clt


def summary(evaluation: Any, tokens_per_s: float) -> dict[str, Any]:
    d = evaluation.downstream
    return {
        "train_tokens_per_s": round(tokens_per_s, 1),
        "l0_per_layer": [round(m.l0, 2) for m in evaluation.layers],
        "fvu_per_layer": [round(v, 4) for v in evaluation.fvu],
        "ce_clean": round(d.ce_loss_without_sae, 4),
        "ce_replacement": round(d.ce_loss_with_sae, 4),
        "ce_all_mlps_ablated": round(d.ce_loss_with_ablation, 4),
        "ce_loss_score": round(d.ce_loss_score, 4),
        "kl_div_score": round(d.kl_div_score, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=512, help="latents per layer")
    parser.add_argument("--target-l0", type=int, default=16, help="per layer (k for topk)")
    parser.add_argument("--rule", choices=["topk", "jumprelu"], default="topk")
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("bundled")
    n_layers, d_model = 4, 256
    topk = args.rule == "topk"
    training = TrainingSection(
        tokens=args.tokens, batch_size=args.batch_size, lr=3e-3 if topk else None,
        target_l0=None if topk else args.target_l0, sparsity_coefficient=0.1,
    )
    heldout = window_batches(
        TokenWindows("bundled", model.tokenizer, args.context_size, split="test"),
        args.eval_tokens,
    )
    rule = {"k": args.target_l0} if topk else {}

    torch.manual_seed(0)
    clt = SAE.create("clt", d_model, args.d_sae, n_layers=n_layers, activation_fn=args.rule,
                     **rule)
    start = time.perf_counter()
    fit = train_clt(clt, model, "bundled", training, context_size=args.context_size,
                    progress=True)
    clt_rate = fit.tokens / (time.perf_counter() - start)
    trained_clt = fit.saes["clt"]

    torch.manual_seed(0)
    hooks_in, hooks_out = clt_hooks(clt)
    jobs = []
    for n in range(n_layers):
        if topk:  # a one-layer CLT is a transcoder; it reads [batch, 1, d] rows
            tc = SAE.create("clt", d_model, args.d_sae, n_layers=1, activation_fn="topk",
                            **rule)
        else:
            tc = SAE.create("jumprelu_transcoder", d_model, args.d_sae, d_out=d_model)
        jobs.append(SAEJob(tc, training, name=f"layer_{n}", hook=hooks_in[n],
                           hook_out=hooks_out[n]))
    store = multisite_store(model, hooks_in + hooks_out, "bundled", training,
                            context_size=args.context_size)
    data = (OneSite(store) if topk else store)
    start = time.perf_counter()
    fit_tc = Trainer(jobs, data, progress=True).fit()
    tc_rate = fit_tc.tokens / (time.perf_counter() - start)
    layers = [fit_tc.saes[f"layer_{n}"] for n in range(n_layers)]
    transcoders = clt_from_layers(layers) if topk else clt_from_transcoders(layers)
    record_hooks(transcoders, hooks_in, hooks_out)

    report = {
        "setup": vars(args) | {"device": "cpu", "torch_threads": torch.get_num_threads()},
        "clt": summary(evaluate_clt(trained_clt, model, heldout), clt_rate),
        "per_layer_transcoders": summary(evaluate_clt(transcoders, model, heldout), tc_rate),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
