"""`saekit cache`: run a model once and write its activations to disk for training."""

from __future__ import annotations

import argparse

from saekit.commands import non_negative_int, positive_int
from saekit.commands.pretokenize import add_dataset_arguments
from saekit.training.config import DataSection


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache", help="write a model's activations at hooks to an on-disk cache",
        description="Run the model over a dataset and write the activations at one or more "
                    "hooks to sharded files. Rerunning the same command resumes an "
                    "interrupted write; train from the folder with --activations.",
    )
    parser.add_argument("--model", required=True,
                        help='"bundled", a local Hugging Face folder, a Hub id or a '
                             "TransformerLens model name")
    parser.add_argument("--backend", default="auto", choices=("auto", "hf", "transformer_lens"),
                        help="model backend (default: auto)")
    parser.add_argument("--hook-name", "--hook", action="append", required=True, dest="hooks",
                        help="hook name; repeat for several hooks from one forward pass")
    parser.add_argument("--hook-head-index", type=non_negative_int, default=None,
                        help="keep one attention head of a per-head hook such as hook_z")
    add_dataset_arguments(parser)
    parser.add_argument("--tokens", type=positive_int, required=True, help="token rows to write")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--heldout-tokens", type=non_negative_int, default=DataSection.eval_tokens,
                        help="a dataset without a test or validation split keeps this many "
                             "tokens of whole documents out of the cache (every 10th from the "
                             "first), for a run's final evaluation; 0 caches every document "
                             "(default %(default)s, a run's default eval_tokens)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="stored activation dtype (default: float32)")
    parser.add_argument("--model-dtype", default=None,
                        choices=("float32", "bfloat16", "float16"),
                        help="dtype to run the model in (default: as loaded)")
    parser.add_argument("--device", default=None, help="device to run the model on")
    parser.add_argument("--model-batch-size", type=positive_int, default=8,
                        help="sequences per forward pass")
    parser.add_argument("--shard-tokens", type=positive_int, default=65536,
                        help="token rows per shard")
    parser.add_argument("--include-special-tokens", dest="exclude_special_tokens",
                        action="store_false",
                        help="keep activations at BOS/EOS/pad tokens (dropped by default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.data.cache import write_activation_cache
    from saekit.data.heldout import HELDOUT_RULE, heldout_documents_batches, training_rows
    from saekit.data.text import heldout_split, load_text_dataset
    from saekit.models import load_model
    from saekit.models.positions import check_context_size
    from saekit.preflight import check_device, check_local_dataset, check_out_folder

    check_device(args.device)
    check_local_dataset(args.dataset)
    check_out_folder(args.out)
    model = load_model(args.model, backend=args.backend, device=args.device,
                       dtype=args.model_dtype, trust_remote_code=args.trust_remote_code)
    check_context_size(model, args.context_size)
    dataset = load_text_dataset(args.dataset, split=args.split, streaming=args.streaming,
                                trust_remote_code=args.trust_remote_code)
    heldout = 0
    if args.heldout_tokens > 0 and args.split == "train" and heldout_split(args.dataset) is None:
        # The documents a run on this dataset evaluates on never enter the cache.
        _, heldout = heldout_documents_batches(
            dataset, model.tokenizer, args.heldout_tokens, context_size=args.context_size,
            prepend_bos=args.prepend_bos,
        )
        dataset = training_rows(dataset, heldout)
        print(f"held out {heldout:,} documents of {args.dataset} ({HELDOUT_RULE})")
    meta = write_activation_cache(
        model, args.hooks if len(args.hooks) > 1 else args.hooks[0], dataset, args.out,
        args.tokens, context_size=args.context_size, model_batch_size=args.model_batch_size,
        shard_rows=args.shard_tokens, dtype=args.dtype, hook_head_index=args.hook_head_index,
        exclude_special_tokens=args.exclude_special_tokens, prepend_bos=args.prepend_bos,
        packing=args.packing, text_column=args.text_column, model_name=args.model,
        dataset_name=args.dataset, heldout_documents=heldout,
    )
    print(f"{args.out}: {meta['n_tokens']} tokens at {', '.join(meta['hooks'])} "
          f"(d_in {meta['d_in']}, {meta['dtype']})")
    return 0
