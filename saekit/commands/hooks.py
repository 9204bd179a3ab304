"""`saekit hooks MODEL`: the hook names a model answers to, with their activation widths."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from saekit.commands.pretrained import table
from saekit.models.hooks import hook_shapes, is_transformer_lens_name
from saekit.models.loading import BACKENDS

PROBE_TEXT = "The quick brown fox"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hooks", help="list a model's hook names and activation widths",
        description="List every hook name the model's backend accepts (TransformerLens names "
                    "and module paths) with the width of its activation, measured on one "
                    "forward pass over a few tokens. Use a name from this list as --hook.",
    )
    parser.add_argument("model", help='"bundled", a local Hugging Face folder, a Hub id or a '
                                      "TransformerLens model name")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="model backend (default: auto: TransformerLens for official "
                             "TransformerLens names, Hugging Face otherwise)")
    parser.add_argument("--match", default=None,
                        help="list only hooks whose name contains this text")
    parser.add_argument("--device", default=None, help="device to run the model on")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run code from the model's repository")
    parser.set_defaults(func=run)


def probe_tokens(backend: Any) -> torch.Tensor:
    """A few tokens [1, pos] of `PROBE_TEXT` (ids 0-3 when the model has no tokenizer)."""
    tokenizer = backend.tokenizer
    ids = list(tokenizer(PROBE_TEXT).input_ids) if tokenizer is not None else []
    if len(ids) < 2:
        ids = [0, 1, 2, 3]
    return torch.tensor([ids])


def width(shape: tuple[int, ...] | None, pos: int) -> str:
    """The width of an activation of `shape` on `pos` tokens: d for [batch, pos, d],
    n_heads x d_head for [batch, pos, n_heads, d_head]; the whole shape for anything else
    (attention patterns, rotary tables)."""
    if shape is None:
        return "- (did not run)"
    if len(shape) >= 3 and shape[1] == pos:
        return " x ".join(str(d) for d in shape[2:])
    return "shape " + " x ".join(str(d) for d in shape)


def hooks_text(backend: Any, match: str | None = None) -> str:
    """The table `saekit hooks` prints."""
    tokens = probe_tokens(backend)
    shapes = hook_shapes(backend, tokens)
    pos = tokens.shape[1]
    names = [n for n in backend.hook_names() if match is None or match in n]
    if not names:
        raise ValueError(
            f"no hook of {getattr(backend, 'name', 'the model')} contains {match!r}; run "
            "without --match to see them all"
        )
    aliases = [n for n in names if is_transformer_lens_name(n)]
    modules = [n for n in names if not is_transformer_lens_name(n)]
    sections = []
    if aliases:
        sections.append(table(
            ("TransformerLens name", "width"), [(n, width(shapes.get(n), pos)) for n in aliases]
        ))
    if modules:
        sections.append(table(
            ("module path", "width"), [(n, width(shapes.get(n), pos)) for n in modules]
        ))
    name = getattr(backend, "name", type(backend).__name__)
    head = (
        f"{name}: {len(names)} hooks ({len(aliases)} TransformerLens names, {len(modules)} "
        f"module paths); widths measured on {pos} tokens; n_heads x d_head for "
        "per-head hooks"
    )
    if not getattr(backend, "causal_lm", True):
        head += "\nan encoder: activations only (no next-token logits, so no CE/KL evaluation)"
    return head + "\n\n" + "\n\n".join(sections)


def run(args: argparse.Namespace) -> int:
    from saekit.models import load_model
    from saekit.preflight import check_device

    check_device(args.device)
    backend = load_model(args.model, backend=args.backend, device=args.device,
                         trust_remote_code=args.trust_remote_code)
    print(hooks_text(backend, args.match))
    return 0
