"""`saekit pretokenize`: tokenize and pack a text dataset once, save it to disk."""

from __future__ import annotations

import argparse
import logging

from saekit.commands import positive_int

logger = logging.getLogger(__name__)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset flags shared by `pretokenize` and `cache`."""
    parser.add_argument("--dataset", required=True,
                        help="local file or folder (txt, jsonl, json, parquet, csv, save_to_disk) "
                             "or a Hugging Face Hub dataset name")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--text-column", default=None,
                        help="column holding the text (default: found automatically)")
    parser.add_argument("--context-size", type=positive_int, default=128,
                        help="tokens per sequence")
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start each sequence with the BOS token, or not (default: as the "
                             "tokenizer does: BOS when it has one, else its own special "
                             "tokens, such as BERT's [CLS] ... [SEP], else none)")
    parser.add_argument("--no-packing", dest="packing", action="store_false",
                        help="one document per sequence (truncated, padded) instead of packing")
    parser.add_argument("--streaming", action="store_true", help="stream a Hub dataset")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a Hub model or dataset run its own code (off by default)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretokenize", help="tokenize and pack a text dataset, save it to disk",
        description="Tokenize and pack a text dataset into fixed-length windows and save it "
                    "with Dataset.save_to_disk; pass the folder as --dataset later.",
    )
    parser.add_argument("--tokenizer", required=True,
                        help='tokenizer: "bundled", a local folder or a Hub model id')
    add_dataset_arguments(parser)
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--max-sequences", type=positive_int, default=None,
                        help="stop after this many sequences")
    parser.set_defaults(func=run)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> object:
    if name == "bundled":
        from saekit.models.loading import _bundled_module

        return _bundled_module().load_bundled_tokenizer()
    from transformers import AutoTokenizer

    from saekit.errors import model_load_error

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # no such folder or Hub id, or the Hub out of reach
        raise model_load_error(name, err, "tokenizer") from err


def run(args: argparse.Namespace) -> int:
    from saekit.data.pretokenize import pretokenize
    from saekit.data.text import load_text_dataset
    from saekit.preflight import check_local_dataset, check_out_folder

    check_local_dataset(args.dataset)
    check_out_folder(args.out)
    tokenizer = load_tokenizer(args.tokenizer, args.trust_remote_code)
    dataset = load_text_dataset(args.dataset, split=args.split, streaming=args.streaming,
                                trust_remote_code=args.trust_remote_code)
    count = pretokenize(
        dataset, tokenizer, args.out, context_size=args.context_size,
        text_column=args.text_column, prepend_bos=args.prepend_bos, packing=args.packing,
        max_windows=args.max_sequences,
    )
    print(f"wrote {count} sequences of {args.context_size} tokens to {args.out}")
    return 0
