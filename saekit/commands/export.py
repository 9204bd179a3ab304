"""`saekit export {neuronpedia,circuit-tracer,saelens} ...`: write SAEs in other tools' layouts.

  neuronpedia TARGET --out DIR      the latents' dashboards as Neuronpedia imports them
                                    (batch-N.json files, as SAEDashboard's runner writes)
  circuit-tracer TARGET... --out DIR
                                    per-layer transcoders as a circuit-tracer transcoder set
                                    (config.yaml + layer_<n>.safetensors)
  saelens TARGET --out DIR          the SAELens folder: exactly what saekit saves
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from saekit.commands import positive_int

logger = logging.getLogger(__name__)


def run_neuronpedia(args: argparse.Namespace) -> int:
    from saekit.analysis.explanations import EXPLANATIONS_FILE
    from saekit.export.folder import check_export_folder
    from saekit.export.neuronpedia import export_neuronpedia
    from saekit.preflight import check_device, check_local_dataset
    from saekit.targets import load_target

    check_device(args.device)
    check_local_dataset(args.dataset)
    check_export_folder(args.out, args.overwrite)
    if args.stats is not None and not Path(args.stats).expanduser().is_dir():
        raise FileNotFoundError(f"--stats {args.stats} is not a folder; pass the folder "
                                "`saekit dashboard` wrote (it holds feature_stats.*)")
    explanations = args.explanations
    if explanations is None:  # explanations.jsonl beside a saved SAE, when there is one
        beside = Path(args.target).expanduser() / EXPLANATIONS_FILE
        explanations = beside if beside.is_file() else None
    sae = load_target(args.target, args.device)
    start = time.perf_counter()
    out = export_neuronpedia(
        sae, args.out, stats=args.stats, model=args.model, dataset=args.dataset,
        n_tokens=args.tokens, context_size=args.context_size,
        model_batch_size=args.model_batch_size, top_k=args.top_k, explanations=explanations,
        model_id=args.model_id, sae_set=args.sae_set, layer=args.layer,
        features_per_batch=args.features_per_batch, backend=args.backend,
        overwrite=args.overwrite,
    )
    logger.info("Neuronpedia export written in %.1f s", time.perf_counter() - start)
    print(out.resolve())
    return 0


def run_circuit_tracer(args: argparse.Namespace) -> int:
    from saekit.export.circuit_tracer import export_circuit_tracer
    from saekit.export.folder import check_export_folder
    from saekit.preflight import check_device
    from saekit.targets import load_target

    check_device(args.device)
    check_export_folder(args.out, args.overwrite)
    saes = [load_target(target, args.device) for target in args.targets]
    out = export_circuit_tracer(
        saes, args.out, model_name=args.model_name, names=args.targets,
        local_paths=args.local_paths, overwrite=args.overwrite,
    )
    print(out)
    return 0


def run_saelens(args: argparse.Namespace) -> int:
    from saekit.export.folder import check_export_folder
    from saekit.export.saelens import export_saelens
    from saekit.preflight import check_device
    from saekit.targets import load_target

    check_device(args.device)
    check_export_folder(args.out, args.overwrite)
    sae = load_target(args.target, args.device)
    print(export_saelens(sae, args.out, overwrite=args.overwrite).resolve())
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace --out when it already holds files (otherwise refused)",
    )
    parser.add_argument("--device", default="cpu", help="device to load the SAE(s) on")


def register(subparsers: argparse._SubParsersAction) -> None:
    from saekit.commands.eval import add_text_source
    from saekit.export.neuronpedia import DEFAULT_TOKENS

    parser = subparsers.add_parser(
        "export", help="write SAEs for Neuronpedia, circuit-tracer or SAELens",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    targets = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    target_help = "the SAE: a saved folder, RELEASE/SAE_ID, or a Hub repo id"

    np_parser = targets.add_parser(
        "neuronpedia", help="the latents' dashboards in the layout Neuronpedia imports",
        description="Statistics of every latent over held-out text (or --stats), written as "
        "SAEDashboard's Neuronpedia batches: examples, logit tables, histograms, density and "
        "explanations when there are some.",
    )
    np_parser.add_argument("target", help=target_help)
    _common(np_parser)
    np_parser.add_argument(
        "--stats", default=None,
        help="folder of statistics `saekit dashboard` saved (default: compute them here)",
    )
    np_parser.add_argument(
        "--explanations", default=None,
        help="explanations.jsonl to include (default: the one in TARGET's folder, if any)",
    )
    add_text_source(np_parser, tokens=DEFAULT_TOKENS, what="the statistics")
    np_parser.add_argument(
        "--top-k", type=positive_int, default=20, help="top examples kept per latent"
    )
    np_parser.add_argument(
        "--model-id", default=None,
        help="Neuronpedia's id of the model, e.g. gpt2-small (default: from the metadata)",
    )
    np_parser.add_argument(
        "--sae-set", default=None,
        help="Neuronpedia's SAE set name; the source is LAYER-SAE_SET (default: from the "
        "metadata's neuronpedia_id, else 'saekit')",
    )
    np_parser.add_argument(
        "--layer", type=int, default=None,
        help="layer number on Neuronpedia (default: the block of the SAE's hook)",
    )
    np_parser.add_argument(
        "--features-per-batch", type=positive_int, default=128,
        help="latents per batch-N.json (default %(default)s)",
    )
    np_parser.set_defaults(func=run_neuronpedia)

    ct_parser = targets.add_parser(
        "circuit-tracer", help="per-layer transcoders as a circuit-tracer transcoder set",
        description="One transcoder per layer, 0..L-1, written as circuit-tracer loads them: "
        "config.yaml and layer_<n>.safetensors.",
    )
    ct_parser.add_argument("targets", nargs="+", metavar="TARGET",
                           help="the transcoders, one per layer, in any order")
    _common(ct_parser)
    ct_parser.add_argument(
        "--model-name", default=None,
        help="Hugging Face id of the model (default: the transcoders' metadata)",
    )
    ct_parser.add_argument(
        "--local-paths", action="store_true",
        help="list the layer files' absolute paths in config.yaml, to load the folder in "
        "place (default: laid out for a Hub repo)",
    )
    ct_parser.set_defaults(func=run_circuit_tracer)

    sl_parser = targets.add_parser(
        "saelens", help="the SAELens folder (what saekit saves)",
        description="Writes exactly what `sae.save(DIR)` writes: SAELens loads it with "
        "SAE.load_from_disk(DIR).",
    )
    sl_parser.add_argument("target", help=target_help)
    _common(sl_parser)
    sl_parser.set_defaults(func=run_saelens)
