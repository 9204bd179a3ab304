"""`saekit dashboard TARGET --out DIR`: a static site describing every latent of an SAE.

One pass of the model over held-out text gathers each latent's statistics
(`feature_statistics`), which are saved beside the site and rendered by `write_dashboard`.
Open DIR/index.html in a browser; no server is needed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from saekit.commands import positive_int
from saekit.saes.base import SAE

logger = logging.getLogger(__name__)

#: Tokens read when none are asked for: enough for steady statistics, quick on a CPU.
DEFAULT_DASHBOARD_TOKENS = 32_768


def build_dashboard(
    sae: SAE,
    out: str | Path,
    *,
    model: Any = None,
    dataset: Any = None,
    n_tokens: int = DEFAULT_DASHBOARD_TOKENS,
    context_size: int | None = None,
    model_batch_size: int = 16,
    top_k: int = 20,
    title: str | None = None,
    backend: str = "auto",
) -> Path:
    """Statistics and site for `sae` under `out`; returns the path of index.html.

    `model` defaults to the model named in the SAE's metadata, `dataset` to the bundled
    corpus's held-out works. The statistics are saved as `out/feature_stats.*`.
    """
    from saekit.analysis.collect import feature_statistics
    from saekit.analysis.dashboard import write_dashboard
    from saekit.evals.api import DEFAULT_CONTEXT_SIZE, heldout_token_batches, resolve_model
    from saekit.models.positions import check_context_size

    model_backend = resolve_model([sae], model, backend)
    meta = sae.cfg.metadata
    context = context_size or meta.context_size or DEFAULT_CONTEXT_SIZE
    check_context_size(model_backend, context)
    batches = heldout_token_batches(
        model_backend.tokenizer, n_tokens, dataset=dataset, context_size=context,
        batch_size=model_batch_size, prepend_bos=meta.window_prepend_bos,
    )
    stats = feature_statistics(sae, model_backend, batches, top_k=top_k)
    out = Path(out)
    stats.save(out)
    name = title or f"{meta.model_name or 'model'} · {meta.hook_name} · {sae.cfg.d_sae} latents"
    return write_dashboard(stats, model_backend.tokenizer, out, title=name)


def run(args: argparse.Namespace) -> int:
    from saekit.commands.eval import load_target
    from saekit.preflight import check_device, check_local_dataset, check_out_folder

    check_device(args.device)
    check_local_dataset(args.dataset)
    check_out_folder(args.out)
    sae = load_target(args.target, args.device)
    start = time.perf_counter()
    index = build_dashboard(
        sae, args.out, model=args.model, dataset=args.dataset, n_tokens=args.tokens,
        context_size=args.context_size, model_batch_size=args.model_batch_size,
        top_k=args.top_k, backend=args.backend,
    )
    logger.info("dashboard written in %.1f s", time.perf_counter() - start)
    print(index.resolve())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from saekit.commands.eval import add_model_batch_size

    parser = subparsers.add_parser(
        "dashboard",
        help="write a static dashboard site of an SAE's latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target", help="the SAE: a saved folder, RELEASE/SAE_ID, or a Hub repo id"
    )
    parser.add_argument("--out", required=True, help="folder to write the site into")
    from saekit.commands.eval import add_backend_argument

    add_backend_argument(parser)
    parser.add_argument(
        "--model", default=None,
        help="model to run (default: the model named in the SAE's metadata)",
    )
    parser.add_argument(
        "--dataset", default=None,
        help="text to read (path or Hub name; default: the bundled corpus's held-out works)",
    )
    parser.add_argument(
        "--tokens", type=positive_int, default=DEFAULT_DASHBOARD_TOKENS,
        help="tokens to read (default %(default)s)",
    )
    parser.add_argument(
        "--context-size", type=positive_int, default=None,
        help="tokens per sequence (default: the SAE's training context size, else 128)",
    )
    add_model_batch_size(parser, default=16)
    parser.add_argument(
        "--top-k", type=positive_int, default=20, help="top examples kept per latent"
    )
    parser.add_argument("--device", default="cpu", help="device for the SAE and the model")
    parser.set_defaults(func=run)
