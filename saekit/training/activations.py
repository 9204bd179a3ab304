"""Where a run's activations come from, chosen once: the hooks (the user's, else defaults),
the held-out text (which training must then never read), and the stream of batches, from the
model over the training text or from an activation cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from saekit.data.heldout import HeldoutText
from saekit.models.backend import ModelBackend
from saekit.saes import architecture_class
from saekit.training.cache_source import (
    batch_ring,
    buffer_rows,
    cached_store,
    run_cache_metadata,
)
from saekit.training.config import TrainConfig
from saekit.training.distributed import DistEnv

#: Sequences per forward pass of the final evaluation.
EVAL_BATCH_SEQUENCES = 8


@dataclass
class ActivationSource:
    """Where a run's training activations come from, chosen once: the model over the
    training text, or an activation cache (`cache`, its metadata)."""

    store: Any
    """The stream of batches the trainer reads (an ActivationStore or a cache reader)."""
    hook: str
    hook_out: str | None
    widths: dict[str, int]
    """Width of each hook's rows."""
    cache: dict[str, Any] | None = None


def cache_metadata(cfg: TrainConfig) -> dict[str, Any] | None:
    """The activation cache's metadata when the run reads one (checked: a missing,
    unfinished or too small cache fails here, before any work), else None."""
    return run_cache_metadata(cfg) if cfg.data.activations is not None else None


def activation_source(
    cfg: TrainConfig,
    backend: ModelBackend,
    dataset: Any,
    cache_meta: dict[str, Any] | None,
    saved_state: dict[str, Any] | None,
    device: str,
    env: DistEnv,
    model_given: bool,
) -> tuple[ActivationSource, HeldoutText | None]:
    """The run's activations (hooks, widths and the stream) and its held-out text: the two
    are chosen together, since the text a run holds out is text it must not train on."""
    hook, hook_out = run_hooks(cfg, backend, cache_meta)
    heldout, training_data = heldout_text(cfg, backend, dataset, cache_meta, saved_state)
    store = model_or_cache_store(
        cfg, backend, hook, hook_out, training_data, device, env,
        cache_meta=cache_meta, model_given=model_given,
    )
    found = store.d_in
    widths = dict(found) if isinstance(found, dict) else {hook: int(found)}
    return ActivationSource(store, hook, hook_out, widths, cache_meta), heldout


def model_or_cache_store(
    cfg: TrainConfig,
    backend: ModelBackend,
    hook: str,
    hook_out: str | None,
    dataset: Any,
    device: str,
    env: DistEnv,
    *,
    cache_meta: dict[str, Any] | None = None,
    model_given: bool = False,
    hooks: list[str] | None = None,
) -> Any:
    """The run's stream of activation batches: from the cache when it reads one, else from
    the model at `hook` (and `hook_out` for transcoders), or at every one of `hooks` (a run
    of several SAEs: {hook: rows} batches from one forward pass)."""
    from saekit.data import ActivationStore
    from saekit.data.rank_store import RankActivationStore

    if cache_meta is not None:
        return cached_store(cfg, backend, hook, hook_out, cache_meta, device, model_given)
    if dataset is None:
        dataset = cfg.data.dataset  # a name ("bundled" included) the store resolves
    transcoder = architecture_class(cfg.sae.architecture).is_transcoder
    wanted: str | list[str] = [hook, hook_out] if transcoder and hook_out else hook
    if hooks is not None:
        wanted = list(hooks)
    batch = cfg.training.batch_size
    if batch % env.world_size:
        raise ValueError(
            f"batch_size={batch} (the global batch) does not split evenly over "
            f"{env.world_size} ranks; make it a multiple of the number of processes"
        )
    batch //= env.world_size
    options: dict[str, Any] = dict(
        context_size=cfg.data.context_size,
        batch_size=batch,
        buffer_size=buffer_rows(batch),
        # Sequences per model forward: small batches leave a CPU mostly idle (8 -> 32 ran
        # the bundled model 2.8x faster here).
        model_batch_size=32,
        prepend_bos=cfg.data.prepend_bos,
        seed=cfg.run.seed + env.rank,
        device=device,
        reuse_batches=batch_ring(cfg, device),
        window_pool=cfg.data.shuffle_tokens // cfg.data.context_size,
        # One pool order on every rank, so the ranks' shares of each draw stay disjoint.
        window_pool_seed=cfg.run.seed,
    )
    if env.distributed:
        return RankActivationStore(
            backend, wanted, dataset, rank=env.rank, world_size=env.world_size, **options
        )
    return ActivationStore(backend, wanted, dataset, **options)


def run_hooks(
    cfg: TrainConfig, backend: ModelBackend, cache_meta: dict[str, Any] | None = None
) -> tuple[str, str | None]:
    names = backend.hook_names()
    hook = cfg.data.hook_name
    if hook is None and cache_meta is not None and len(cache_meta["hooks"]) == 1:
        # The cache holds one hook: that is the one the user means to train on.
        hook = cache_meta["hooks"][0]
    layers = sorted(
        {int(m.group(1)) for n in names if (m := re.match(r"^blocks\.(\d+)\.hook_resid_pre$", n))}
    )
    if hook is None:
        if not layers:
            raise ValueError(
                "no default hook for this model (it has no blocks.N.hook_resid_pre hooks); "
                f"pass --hook, e.g. one of {', '.join(names[:5])}"
            )
        hook = f"blocks.{layers[len(layers) // 2]}.hook_resid_pre"
    hook_out = cfg.data.hook_name_out
    if architecture_class(cfg.sae.architecture).is_transcoder and hook_out is None:
        match = re.match(r"^blocks\.(\d+)\.", hook)
        if match is None:
            raise ValueError(f"no default hook_out for hook {hook!r}; pass --hook-out")
        hook_out = f"blocks.{match.group(1)}.hook_mlp_out"
    return hook, hook_out


def heldout_text(
    cfg: TrainConfig,
    backend: ModelBackend,
    dataset: Any,
    cache_meta: dict[str, Any] | None,
    saved_state: dict[str, Any] | None,
) -> tuple[HeldoutText | None, Any]:
    """The run's held-out text, and the training data without it (see saekit.data.heldout).

    Every rank computes the same choice; only rank 0 evaluates."""
    from saekit.data.heldout import (
        choose_eval_text,
        describe_source,
        heldout_documents_batches,
        training_rows,
    )
    from saekit.data.heldout import same_source as same
    from saekit.data.text import load_text_dataset
    from saekit.data.tokens import TokenWindows, window_batches

    source = dataset if dataset is not None else cfg.data.dataset
    if cfg.data.eval_tokens <= 0:
        return None, source
    choice = choose_eval_text(source, cfg.data.eval_dataset, cfg.data.eval_split)
    options = dict(context_size=cfg.data.context_size, prepend_bos=cfg.data.prepend_bos)
    tokenizer = backend.tokenizer
    if not choice.from_training_data:
        windows = TokenWindows(choice.source, tokenizer, split=choice.split, **options)
        batches = window_batches(windows, cfg.data.eval_tokens, EVAL_BATCH_SEQUENCES)
        return HeldoutText(batches, describe_source(choice.source), choice.split), source
    limit = None
    if saved_state is not None:
        # A run started before documents were held out trained on all of them.
        limit = saved_state.get("heldout_documents", 0)
    if cache_meta is not None and same(cache_meta.get("dataset"), source):
        limit = cache_meta.get("heldout_documents", 0)
    if limit == 0:
        raise ValueError(
            f"the dataset {describe_source(source)} has no test or validation split and the "
            "run's training data holds every one of its documents, so no held-out text is "
            "left for the final evaluation; name held-out text with --eval-dataset, or pass "
            "--eval-tokens 0 to skip the evaluation"
        )
    loaded = load_text_dataset(source, split="train")
    batches, n_heldout = heldout_documents_batches(
        loaded, tokenizer, cfg.data.eval_tokens, limit=limit,
        batch_size=EVAL_BATCH_SEQUENCES, **options,
    )
    heldout = HeldoutText(batches, describe_source(source), None, n_heldout)
    training = loaded if cache_meta is not None else training_rows(loaded, n_heldout)
    return heldout, training
