"""`saekit dashboard TARGET --out DIR`: a static site describing every latent of an SAE.

One pass of the model over held-out text gathers each latent's statistics
(`feature_statistics`); the site reads them from DIR (`FeatureStats.load(DIR)` reads them too).
Open DIR/index.html in a browser; no server is needed. Explanations (auto-interpretation
results, explanations.jsonl) are shown and become a sort order: from --explanations, else from
DIR or the SAE's folder when one of them holds an explanations.jsonl.

A crosscoder reads every site it records (several hooks of one model, or one hook of each of
the models it compares, loaded by the names it records); its pages add each latent's relative
decoder norm and class, and a summary of them is printed.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.commands import non_negative_int, positive_int
from saekit.saes.base import SAE

if TYPE_CHECKING:
    from saekit.analysis.explanations import Explanation

logger = logging.getLogger(__name__)

#: Tokens read when none are asked for: enough for steady statistics, quick on a CPU.
DEFAULT_DASHBOARD_TOKENS = 32_768
#: Context kept around each example's token; pages show 12 + 4 and widen to all of it.
DEFAULT_LEFT, DEFAULT_RIGHT = 24, 8


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
    left: int = DEFAULT_LEFT,
    right: int = DEFAULT_RIGHT,
    title: str | None = None,
    backend: str = "auto",
    sae_name: str = "",
    explanations: Mapping[int, Explanation] | None = None,
) -> Path:
    """Statistics and site for `sae` under `out`; returns the path of index.html.

    `model` defaults to the model named in the SAE's metadata (see `statistics_models`; a
    crosscoder over several models takes a list), `dataset` to the bundled corpus's held-out
    works. `left` and `right` are the context tokens kept before and after
    each example's token. The statistics are saved as `out/feature_stats.js` and
    `out/feature_stats/` (`FeatureStats.load(out)` reads them). `sae_name` (e.g. the folder
    it was loaded from) and `explanations` are shown on the pages.
    """
    from saekit.analysis.collect import feature_statistics, statistics_models
    from saekit.analysis.dashboard import check_explanations, write_dashboard
    from saekit.evals.api import DEFAULT_CONTEXT_SIZE, heldout_token_batches
    from saekit.models.positions import check_context_size

    if explanations:
        check_explanations(explanations, sae.cfg.d_sae)
    models = statistics_models(sae, model, backend)
    listed = models if isinstance(models, list) else [models]
    meta = sae.cfg.metadata
    context = context_size or meta.context_size or DEFAULT_CONTEXT_SIZE
    for one in listed:
        check_context_size(one, context)
    tokenizer = listed[0].tokenizer
    batches = heldout_token_batches(
        tokenizer, n_tokens, dataset=dataset, context_size=context,
        batch_size=model_batch_size, prepend_bos=meta.window_prepend_bos,
    )
    stats = feature_statistics(
        sae, models, batches, top_k=top_k, left=left, right=right
    )
    return write_dashboard(
        stats, tokenizer, out, title=title, sae_name=sae_name,
        model_name="" if len(listed) > 1 else meta.model_name or "",
        hook_name=hook_description(sae), explanations=explanations,
    )


def hook_description(sae: SAE) -> str:
    """Where the SAE reads (and writes, for a transcoder), with its head when it has one;
    empty for a crosscoder, whose pages name its sites."""
    meta = sae.cfg.metadata
    if sae.multi_site:
        return ""
    hook = meta.hook_name or ""
    if meta.hook_head_index is not None:
        hook += f" (head {meta.hook_head_index})"
    if meta.hook_name_out and meta.hook_name_out != meta.hook_name:
        hook += f" → {meta.hook_name_out}"
    return hook


def find_explanations(given: str | None, out: str, target: str) -> dict[int, Explanation]:
    """The explanations to show: from `given` (a file, or a folder holding explanations.jsonl),
    else from explanations.jsonl in the output folder or the SAE's folder; {} when none."""
    from saekit.analysis.explanations import explanations_path, read_explanations

    if given is not None:
        path = explanations_path(given)
        if not path.is_file():
            raise ValueError(
                f"--explanations {given}: no such file; pass an explanations.jsonl (as "
                "auto-interpretation writes it) or a folder holding one"
            )
        return read_explanations(path)
    for folder in (Path(out), Path(target).expanduser()):
        path = explanations_path(folder) if folder.is_dir() else None
        if path is not None and path.is_file():
            logger.info("showing the explanations in %s", path)
            return read_explanations(path)
    return {}


def run(args: argparse.Namespace) -> int:
    from saekit.analysis.crosscoder_norms import crosscoder_norms
    from saekit.analysis.dashboard import check_explanations
    from saekit.commands.report import relative_norm_summary
    from saekit.preflight import check_device, check_local_dataset, check_out_folder
    from saekit.targets import load_target

    check_device(args.device)
    check_local_dataset(args.dataset)
    check_out_folder(args.out)
    explanations = find_explanations(args.explanations, args.out, args.target)
    sae = load_target(args.target, args.device)
    check_explanations(explanations, sae.cfg.d_sae)
    start = time.perf_counter()
    index = build_dashboard(
        sae, args.out, model=args.model, dataset=args.dataset, n_tokens=args.tokens,
        context_size=args.context_size, model_batch_size=args.model_batch_size,
        top_k=args.top_k, left=args.left, right=args.right, backend=args.backend,
        sae_name=args.target, explanations=explanations,
    )
    logger.info("dashboard written in %.1f s", time.perf_counter() - start)
    norms = crosscoder_norms(sae)
    if norms is not None:
        print(relative_norm_summary(norms))
    print(index.resolve())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from saekit.commands.eval import add_text_source

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
    add_text_source(parser, tokens=DEFAULT_DASHBOARD_TOKENS, what="the statistics")
    parser.add_argument(
        "--top-k", type=positive_int, default=20, help="top examples kept per latent"
    )
    parser.add_argument(
        "--left", type=non_negative_int, default=DEFAULT_LEFT,
        help="context tokens kept before each example's token (default %(default)s; pages "
        "show 12 and widen to all)",
    )
    parser.add_argument(
        "--right", type=non_negative_int, default=DEFAULT_RIGHT,
        help="context tokens kept after each example's token (default %(default)s)",
    )
    parser.add_argument(
        "--explanations", default=None, metavar="FILE",
        help="explanations to show (explanations.jsonl, or a folder holding one; default: "
        "the one in --out or in the SAE's folder, if any)",
    )
    parser.add_argument("--device", default="cpu", help="device for the SAE and the model")
    parser.set_defaults(func=run)
