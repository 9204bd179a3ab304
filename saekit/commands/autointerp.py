"""`saekit autointerp TARGET --explainer SPEC --out DIR`: explain what each latent of an SAE
means with a language model, and score how faithful each explanation is.

The explainer sees each latent's top activating contexts and samples from each activation
quantile band (firing tokens marked <<like this>>) and writes a one-line explanation; the
scorer then judges held-out contexts from it: detection (which contexts activate the
latent?) and fuzzing (are the marked tokens the ones it fires on?). Scores per latent are
balanced accuracy and F1. Results: DIR/explanations.jsonl, one line per latent.

Models: openai:MODEL is any OpenAI-compatible chat endpoint (--base-url; vLLM, Ollama,
llama.cpp's server, hosted APIs; key in $OPENAI_API_KEY or --api-key-env), hf:NAME_OR_PATH a
local Hugging Face causal LM. The run says how many calls and tokens it will send before it
starts (--dry-run stops there and prints the first prompt); every answer is kept in DIR, so
an interrupted run resumes where it stopped when given the same command.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

from saekit.commands import positive_int

logger = logging.getLogger(__name__)

#: Flags of the run's settings: (flag, AutointerpConfig field, type).
CONFIG_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--n-top", "n_top", positive_int),
    ("--n-bands", "n_bands", positive_int),
    ("--per-band", "per_band", positive_int),
    ("--n-test", "n_test", positive_int),
    ("--n-negatives", "n_negatives", positive_int),
    ("--examples-per-prompt", "examples_per_prompt", positive_int),
    ("--mark-threshold", "mark_threshold", float),
    ("--fuzz-mode", "fuzz_mode", str),
    ("--min-examples", "min_examples", positive_int),
    ("--temperature", "temperature", float),
    ("--seed", "seed", int),
)


def _client(spec: str, flag: str, base_url: str, args: argparse.Namespace) -> Any:
    from saekit.autointerp.clients import make_client

    return make_client(
        spec, flag=flag, base_url=base_url, api_key_env=args.api_key_env,
        timeout=args.timeout, max_retries=args.max_retries, retry_delay=args.retry_delay,
        concurrency=args.concurrency, device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    from saekit.autointerp.clients import OpenAIClient, parse_client_spec
    from saekit.autointerp.config import AutointerpConfig
    from saekit.autointerp.pipeline import autointerp
    from saekit.autointerp.run import format_messages
    from saekit.autointerp.selection import parse_latents
    from saekit.preflight import check_device, check_local_dataset, check_out_folder
    from saekit.targets import load_target

    # Everything that can be checked without a model or the network, first.
    selection = parse_latents(args.latents)
    parse_client_spec(args.explainer, "--explainer")
    if args.scorer is not None:
        parse_client_spec(args.scorer, "--scorer")
    config = AutointerpConfig(**{name: getattr(args, name) for _, name, _ in CONFIG_FLAGS})
    check_out_folder(args.out)
    check_device(args.device)
    check_local_dataset(args.dataset)
    if args.stats is not None and not os.path.isdir(args.stats):
        raise FileNotFoundError(
            f"--stats {args.stats}: no such folder; pass the folder `saekit dashboard` wrote "
            "(it saves the statistics beside the site)"
        )
    base_url = args.base_url
    explainer = _client(args.explainer, "--explainer", base_url, args)
    scorer = None
    if args.scorer is not None and args.scorer != args.explainer:
        scorer = _client(args.scorer, "--scorer", args.scorer_base_url or base_url, args)
    if not args.dry_run:
        for client in (explainer, scorer):
            if isinstance(client, OpenAIClient):
                client.check()
    sae = load_target(args.target, args.device)
    selection.check(sae.cfg.d_sae)
    result = autointerp(
        sae, args.out, explainer=explainer, scorer=scorer, latents=selection,
        model=args.model, dataset=args.dataset, stats=args.stats, n_tokens=args.tokens,
        context_size=args.context_size, model_batch_size=args.model_batch_size,
        negative_windows=args.negative_windows, config=config, concurrency=args.concurrency,
        replace=args.replace,
        dry_run=args.dry_run, backend=args.backend,
    )
    if args.dry_run:
        print(f"dry run: {result.plan.summary()}")
        if result.plan.first_prompt is not None:
            print(f"first prompt (latent {result.plan.todo[0]}):\n")
            print(format_messages(result.plan.first_prompt))
        return 0
    for scorer_name in ("detection", "fuzzing"):
        values = [e.score(scorer_name) for e in result.explanations.values()]
        read = [v for v in values if math.isfinite(v)]
        if read:
            print(f"{scorer_name}: mean balanced accuracy {sum(read) / len(read):.3f} over "
                  f"{len(read)} latents")
        if len(read) < len(values):
            print(f"{scorer_name}: no score for {len(values) - len(read)} latents (no test "
                  "contexts, or no answer of the scorer could be read)")
    print(result.path.resolve())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from saekit.autointerp.clients import DEFAULT_BASE_URL, DEFAULT_KEY_ENV
    from saekit.autointerp.config import AutointerpConfig
    from saekit.autointerp.pipeline import DEFAULT_NEGATIVE_WINDOWS, DEFAULT_TOKENS
    from saekit.commands.eval import add_text_source
    from saekit.training.fields import field_docs

    parser = subparsers.add_parser(
        "autointerp",
        help="explain an SAE's latents with a language model and score the explanations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target", help="the SAE: a saved folder, RELEASE/SAE_ID, or a Hub repo id"
    )
    parser.add_argument("--out", required=True,
                        help="folder for explanations.jsonl and the run's cache (a dashboard "
                             "folder works: its statistics are reused)")
    models = parser.add_argument_group("explainer and scorer")
    models.add_argument("--explainer", required=True,
                        help="the explaining model: openai:MODEL (an OpenAI-compatible "
                             "endpoint) or hf:NAME_OR_PATH (a local Hugging Face model; "
                             "hf:bundled is the demo model)")
    models.add_argument("--scorer", default=None,
                        help="the scoring model, in the same form (default: the explainer)")
    models.add_argument("--base-url",
                        default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                        help="the endpoint's base URL, e.g. http://localhost:8000/v1 for "
                             "vLLM, http://localhost:11434/v1 for Ollama (default: "
                             "$OPENAI_BASE_URL, else %(default)s)")
    models.add_argument("--scorer-base-url", default=None,
                        help="the scorer's endpoint, when it is another (default: --base-url)")
    models.add_argument("--api-key-env", default=DEFAULT_KEY_ENV,
                        help="environment variable holding the endpoint's key (default "
                             "%(default)s; unset means no key, as local servers need)")
    models.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for one answer (default %(default)s)")
    models.add_argument("--max-retries", type=int, default=5,
                        help="further tries after a timeout, a 429 or a 5xx answer "
                             "(default %(default)s)")
    models.add_argument("--retry-delay", type=float, default=1.0,
                        help="seconds before the first retry, doubled for each further one "
                             "(default %(default)s)")
    models.add_argument("--concurrency", type=positive_int, default=4,
                        help="calls to the endpoint at once (default %(default)s; local "
                             "models take one at a time)")
    parser.add_argument("--latents", default="random:100",
                        help="latents to explain: ids and ranges (0-999 or 3,17,40-49), "
                             "random:N (N random latents that fire), or all "
                             "(default %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what the run would send and print the first prompt; send "
                             "and write nothing")
    parser.add_argument("--replace", action="store_true",
                        help="explain latents again that --out already explains with other "
                             "models or settings (the new lines supersede the old)")
    data = parser.add_argument_group("statistics")
    data.add_argument("--stats", default=None,
                      help="folder of saved feature statistics (what `saekit dashboard` "
                           "writes) to reuse instead of gathering them")
    add_text_source(data, tokens=DEFAULT_TOKENS, what="the statistics")
    data.add_argument("--negative-windows", type=positive_int,
                      default=DEFAULT_NEGATIVE_WINDOWS,
                      help="windows of held-out text gathered as non-activating contexts "
                           "(default %(default)s)")
    data.add_argument("--device", default="cpu",
                      help="device for the SAE, the model and a local explainer")
    settings = parser.add_argument_group("explaining and scoring")
    docs, defaults = field_docs(AutointerpConfig), AutointerpConfig()
    for flag, name, kind in CONFIG_FLAGS:
        default = getattr(defaults, name)
        settings.add_argument(flag, dest=name, type=kind, default=default,
                              help=f"{docs[name]} (default: {default})")
    parser.set_defaults(func=run)
