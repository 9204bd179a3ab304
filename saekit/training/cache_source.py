"""Training from an activation cache (`--activations DIR`): the checks that a cache can
serve a run, and the reader that replaces the activation store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from saekit.saes import architecture_class
from saekit.training.config import RUN_CONFIG_FILE, TrainConfig
from saekit.training.distributed import DistEnv

log = logging.getLogger(__name__)


#: Batches in a training shuffle buffer (at least; more for small batches).
BUFFER_BATCHES = 8


def buffer_rows(batch: int) -> int:
    """Shuffle-buffer rows for a (per-rank) batch size; the same for the model and a cache."""
    return max(batch * BUFFER_BATCHES, 16_384)


#: Batches a `Prefetcher` makes ahead of the training step: a store makes a whole buffer's
#: batches in one burst (one fill) and none while it fills, so the producer holds that many
#: to keep the step fed through the next fill (benchmarks/bench_overlap.py, 2 CPU cores,
#: a 4-batch buffer: 0.92x of taking turns with 2 ahead, 0.98x with 4).
PREFETCH_DEPTH = BUFFER_BATCHES
#: Batches the training stores gather into reused memory (`reuse_batches`) when nothing is
#: made ahead: the trainer is done with a batch when its step ends.
BATCH_RING = 4


def prefetches(cfg: TrainConfig, device: str) -> bool:
    """Whether batches are made ahead in a background thread: on accelerators only (on CPU
    cores the overlap measured level with taking turns: benchmarks/README.md)."""
    return cfg.run.prefetch and torch.device(device).type != "cpu"


def batch_ring(cfg: TrainConfig, device: str) -> int:
    """Reused batch tensors for a run: a prefetcher also holds PREFETCH_DEPTH made batches
    plus the one it is making."""
    return PREFETCH_DEPTH + 2 if prefetches(cfg, device) else BATCH_RING


def refuse_cache_under_torchrun(cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse --activations with several processes, before any process group starts.

    Each rank would need a disjoint share of the cache; different seeds over the same
    shards are not disjoint (ranks would train on the same rows), so say so instead."""
    if not env.distributed:
        return
    activations = cfg.data.activations
    if cfg.run.resume is not None:
        saved = Path(cfg.run.resume) / RUN_CONFIG_FILE
        if saved.is_file():
            activations = TrainConfig.load(saved).data.activations
    if activations is not None:
        raise ValueError(
            f"--activations with torchrun is not supported yet ({env.world_size} processes "
            f"launched, cache {activations}): the ranks would not get disjoint shares of the "
            "cache. Train from the cache in one process (without torchrun), or drop "
            "--activations to read activations from the model on every rank"
        )


def run_cache_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """The metadata of the run's activation cache, refusing one that cannot serve the run
    whatever the model: unfinished, per-head, or holding too few tokens."""
    from saekit.data.cache import CacheError, read_cache_metadata

    folder = cfg.data.activations
    assert folder is not None
    meta = read_cache_metadata(folder)
    if not meta["complete"]:
        raise CacheError(
            f"the activation cache in {folder} is unfinished ({meta['n_tokens']} tokens "
            "recorded); run the same `saekit cache` command again to finish it"
        )
    if meta.get("hook_head_index") is not None:
        raise CacheError(
            f"the activation cache in {folder} holds one attention head "
            f"(hook_head_index={meta['hook_head_index']}) of {meta['hooks']}; saekit train "
            "trains on whole hooks, so write the cache without --hook-head-index"
        )
    batch = cfg.training.batch_size
    # The trainer takes whole batches until it has seen `tokens`, so it needs this many rows.
    needed = -(-cfg.training.tokens // batch) * batch
    have = int(meta["n_tokens"])
    if have < needed:
        usable = have // batch * batch
        lower = (
            f"lower --tokens to at most {usable:,}" if usable
            else f"lower --batch-size and --tokens to at most {have:,}"
        )
        raise CacheError(
            f"the activation cache in {folder} holds {have:,} tokens, but the run trains on "
            f"{cfg.training.tokens:,} tokens ({needed:,} rows in whole batches of {batch:,}); "
            f"{lower}, or write a larger cache with `saekit cache --tokens {needed}`"
        )
    return meta


def cached_store(
    cfg: TrainConfig,
    backend: Any,
    hook: str,
    hook_out: str | None,
    meta: dict[str, Any],
    device: str,
    model_given: bool,
) -> Any:
    """A `CachedActivations` over the run's cache, after checking the cache fits the run.

    Rows are mixed in blocks drawn from the whole cache (`mix="blocks"`): the cache holds
    rows in corpus order, and whole-shard mixing fed the SAE 64 batches in a row from one
    stretch of ~65k tokens, which left far more latents dead."""
    from saekit.data.cache import CachedActivations

    transcoder = architecture_class(cfg.sae.architecture).is_transcoder
    hooks = [hook, hook_out] if transcoder and hook_out else [hook]
    check_cache_fits(cfg, backend, hooks, meta, model_given)
    batch = cfg.training.batch_size
    return CachedActivations(
        cfg.data.activations,  # type: ignore[arg-type]
        batch_size=batch,
        buffer_size=buffer_rows(batch),
        hooks=hooks if len(hooks) > 1 else hook,
        seed=cfg.run.seed,
        # Batches in float32, as the ActivationStore gives them whatever the model's dtype.
        dtype=torch.float32,
        device=device,
        reuse_batches=batch_ring(cfg, device),
        mix="blocks",
    )


def check_cache_fits(
    cfg: TrainConfig, backend: Any, hooks: list[str], meta: dict[str, Any], model_given: bool
) -> None:
    """Refuse a cache written for another model, hook, width, context size, BOS setting or
    tokenizer, naming every difference.

    The model name agrees when the cache names the config's model or the loaded backend's
    own name (`saekit cache --model bundled` records "bundled", as the run's default does; an
    in-memory model is recorded under its backend name by `write_activation_cache`)."""
    from saekit.data.cache import CacheError, check_cache_matches, tokenizer_identity
    from saekit.data.store import flatten_activation
    from saekit.data.tokens import sequence_framing

    folder = cfg.data.activations
    backend_name = getattr(backend, "name", None)
    names = {cfg.data.model, backend_name} - {None}
    expect_model = None
    if meta["model"] not in names:
        expect_model = backend_name if model_given and backend_name else cfg.data.model
    problems: list[str] = []
    # The loaded model's own width at each hook, from a two-token forward pass; it also
    # checks the hooks exist in the model, which the final evaluation needs.
    probe_id = 0
    tokenizer = backend.tokenizer
    for attr in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            probe_id = int(value)
            break
    probe = torch.full((1, 2), probe_id, dtype=torch.long)
    widths: dict[str, int] | None = None
    try:
        with torch.no_grad():
            acts = backend.activations(probe, hooks)
        widths = {h: int(flatten_activation(acts[h]).shape[-1]) for h in hooks}
    except (ValueError, KeyError) as err:
        problems.append(f"the model cannot give the run's hook(s) {hooks}: {err}")
    run_framing = sequence_framing(tokenizer, cfg.data.prepend_bos)[0]
    cache_framing = meta.get("framing") or ("bos" if meta["prepend_bos"] else "none")
    if cache_framing != run_framing:
        problems.append(
            f"special tokens: the cache's sequences are framed {cache_framing!r}, the run's "
            f"{run_framing!r} (prepend_bos)"
        )
    if not meta.get("exclude_special_tokens", True):
        problems.append(
            "special tokens: the cache keeps BOS/EOS/pad activations, training leaves them "
            "out (write the cache without --include-special-tokens)"
        )
    cached_tok, run_tok = meta.get("tokenizer"), tokenizer_identity(tokenizer)
    if cached_tok and run_tok and any(
        cached_tok.get(k) != run_tok.get(k) for k in ("vocab_size", "vocab_crc32")
    ):
        problems.append(
            f"tokenizer: cache has {cached_tok.get('name')!r} ({cached_tok.get('vocab_size')} "
            f"tokens), the model's is {run_tok.get('name')!r} ({run_tok.get('vocab_size')} "
            "tokens)"
        )
    advice = (
        f" (cache: {folder}). Pass the flags the cache was written with, or write a cache "
        "for this run with `saekit cache`"
    )
    try:
        check_cache_matches(
            meta, model=expect_model, hooks=hooks, d_in=widths, context_size=cfg.data.context_size
        )
    except CacheError as err:
        raise CacheError("; ".join([str(err), *problems]) + advice) from None
    if problems:
        raise CacheError(
            "the activation cache does not match this run: " + "; ".join(problems) + advice
        )
    if cfg.data.dataset != meta.get("dataset") and meta.get("dataset") is not None:
        log.warning(
            "the cache in %s was written from dataset %r, the run names %r: training reads the "
            "cache, the final held-out evaluation reads %r (pass --dataset %s to evaluate on "
            "the cache's dataset)",
            folder, meta["dataset"], cfg.data.dataset, cfg.data.dataset, meta["dataset"],
        )
