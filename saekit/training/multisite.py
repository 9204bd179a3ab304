"""Training on several sites of one model at once, from one forward pass per batch: the
activations of every layer stacked into one tensor [batch, n_sites, d], as a cross-layer
transcoder (and a crosscoder) reads them.

`StackedBatches` turns the `{hook: [batch, d]}` batches of an `ActivationStore` over several
hooks into `(inputs [batch, n, d_in], targets [batch, n, d_out])` pairs (or inputs alone),
keeping the store's position for checkpoints; `train_clt` runs the usual trainer on them.
`train_crosscoder` trains a crosscoder on several hooks of one model, or on the same hook of
several models (`SideBySideModels` runs each once per batch on the same tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.models.side_by_side import SideBySideModels
from saekit.saes.clt import (
    CLT_INPUT_HOOK,
    CLT_OUTPUT_HOOK,
    CrossLayerTranscoder,
    clt_hooks,
    record_hooks,
)
from saekit.saes.crosscoder import MODELS_KEY, SITE_HOOKS_KEY, Crosscoder, crosscoder_sites
from saekit.training.config import TrainingSection
from saekit.training.trainer import FitResult, SAEJob, Trainer


class StackedBatches:
    """Iterator of stacked batches over an iterator of `{hook: [batch, d]}` mappings:
    `(x [batch, n, d_in], y [batch, n, d_out])` with `hooks_out`, `x` alone without.

    `state_dict` / `load_state_dict` pass through to the source (None when it has none, so
    that the trainer replays the stream on resume instead)."""

    def __init__(
        self,
        source: Iterator[Mapping[str, Tensor]],
        hooks_in: Sequence[str],
        hooks_out: Sequence[str] | None = None,
    ) -> None:
        if not hooks_in:
            raise ValueError("no input hooks given; pass one per site")
        self.source = source
        self.hooks_in = list(hooks_in)
        self.hooks_out = None if hooks_out is None else list(hooks_out)

    def __iter__(self) -> StackedBatches:
        return self

    def __next__(self) -> Tensor | tuple[Tensor, Tensor]:
        batch = next(self.source)
        if not isinstance(batch, Mapping):
            raise ValueError(
                "stacking needs {hook: tensor} batches (a store over several hooks), got "
                f"{type(batch).__name__}"
            )
        x = _stack(batch, self.hooks_in)  # [batch, n, d_in]
        if self.hooks_out is None:
            return x
        return x, _stack(batch, self.hooks_out)  # [batch, n, d_out]

    def state_dict(self) -> Any:
        state = getattr(self.source, "state_dict", None)
        return state() if state is not None else None

    def load_state_dict(self, state: Any) -> None:
        self.source.load_state_dict(state)  # type: ignore[attr-defined]


def _stack(batch: Mapping[str, Tensor], hooks: list[str]) -> Tensor:
    missing = [h for h in hooks if h not in batch]
    if missing:
        raise ValueError(f"batches hold no {missing} (they hold {', '.join(batch)})")
    return torch.stack([batch[h] for h in hooks], dim=1)


def multisite_store(
    model: Any,
    hooks: Sequence[str],
    dataset: Any,
    training: TrainingSection,
    *,
    context_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    model_batch_size: int = 32,
    buffer_size: int | None = None,
) -> Any:
    """An `ActivationStore` serving `{hook: rows}` for every hook from one forward pass
    (`buffer_size` shuffle rows; by default the trainer's usual buffer)."""
    from saekit.data import ActivationStore
    from saekit.training.cache_source import BATCH_RING, buffer_rows

    return ActivationStore(
        model, list(dict.fromkeys(hooks)), dataset,
        context_size=context_size, batch_size=training.batch_size,
        buffer_size=buffer_size or buffer_rows(training.batch_size),
        model_batch_size=model_batch_size,
        seed=seed, device=device, reuse_batches=BATCH_RING,
    )


def train_clt(
    clt: CrossLayerTranscoder,
    model: Any,
    dataset: Any,
    training: TrainingSection,
    *,
    layers: Sequence[int] | None = None,
    hook_in: str = CLT_INPUT_HOOK,
    hook_out: str = CLT_OUTPUT_HOOK,
    run_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    context_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Train a cross-layer transcoder on `model` (a `ModelBackend`) over `dataset` (any text
    source `TokenWindows` reads), every layer's input and MLP output from the same forward
    pass; the usual trainer (target L0, dead-latent remedies, checkpoints in `run_dir`
    every `checkpoint_every` tokens, exact resume with `resume=True`).

    The hooks are the CLT's recorded ones, or `blocks.<l>.<hook_in>` and
    `blocks.<l>.<hook_out>` for `layers` (default: 0..n_layers-1); they are recorded in the
    CLT's metadata. Returns the trainer's `FitResult` (the trained CLT under "clt")."""
    if not isinstance(clt, CrossLayerTranscoder):
        raise ValueError(f"train_clt trains a cross-layer transcoder, got {type(clt).__name__}")
    hooks_in, hooks_out = clt_hooks(clt, layers, hook_in, hook_out)
    record_hooks(clt, hooks_in, hooks_out)
    if clt.cfg.metadata.model_name is None:
        clt.cfg.metadata.model_name = getattr(model, "name", None)
    clt.cfg.metadata.context_size = context_size
    store = multisite_store(
        model, hooks_in + hooks_out, dataset, training,
        context_size=context_size, seed=seed, device=clt.device,
    )
    data = StackedBatches(store, hooks_in, hooks_out)
    trainer = Trainer(
        SAEJob(clt, training, name="clt"), data, run_dir,
        checkpoint_every=checkpoint_every, progress=progress,
    )
    return trainer.fit(resume=resume)


# ----- crosscoders ---------------------------------------------------------------------------


def train_crosscoder(
    crosscoder: Crosscoder,
    models: Any,
    dataset: Any,
    training: TrainingSection,
    *,
    hooks: str | Sequence[str] | None = None,
    run_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    context_size: int = 128,
    seed: int = 0,
    buffer_size: int | None = None,
    progress: bool = False,
) -> FitResult:
    """Train a crosscoder with the usual trainer (target L0, dead-latent remedies,
    checkpoints in `run_dir` every `checkpoint_every` tokens, exact resume).

    `models` is one backend read at several `hooks` (layers; one forward pass per batch), or
    a list of n_sites backends sharing a tokenizer (model diffing: each runs once per batch on
    the same tokens) read at one hook each (`hooks` a single name for the same hook in all,
    or one per model). `buffer_size` is the shuffle buffer's rows (default: the trainer's
    usual one, at least 16,384; a smaller one starts sooner and mixes less). The hooks and
    model names are recorded in the crosscoder's metadata.
    Returns the trainer's `FitResult` (the trained crosscoder under "crosscoder")."""
    from saekit.models.positions import check_context_size

    if not isinstance(crosscoder, Crosscoder):
        raise ValueError(
            f"train_crosscoder trains a crosscoder, got {type(crosscoder).__name__}"
        )
    listed = list(models) if isinstance(models, (list, tuple)) else [models]
    if not listed:
        raise ValueError("no models given; pass one model (several hooks) or one per site")
    site_hooks = crosscoder_sites(crosscoder, listed, hooks)
    for model in listed:
        check_context_size(model, context_size, "context_size")
    if len(listed) == 1:
        backend, keys = listed[0], site_hooks
    else:
        backend = SideBySideModels(listed)
        keys = [SideBySideModels.site(i, h) for i, h in enumerate(site_hooks)]
    store = multisite_store(
        backend, keys, dataset, training,
        context_size=context_size, seed=seed, device=crosscoder.device,
        buffer_size=buffer_size,
    )
    widths = store.d_in  # one short forward pass: wrong hooks fail before training starts
    wrong = {k: w for k, w in widths.items() if w != crosscoder.cfg.d_in}
    if wrong:
        raise ValueError(
            f"the crosscoder reads width {crosscoder.cfg.d_in}, but {wrong} have other widths"
        )
    record_sites(crosscoder, listed, site_hooks, context_size)
    trainer = Trainer(
        SAEJob(crosscoder, training, name="crosscoder"), StackedBatches(store, keys), run_dir,
        checkpoint_every=checkpoint_every, progress=progress,
    )
    return trainer.fit(resume=resume)


def record_sites(
    crosscoder: Crosscoder, models: list[Any], hooks: list[str], context_size: int
) -> None:
    """Write the crosscoder's sites into its metadata: the hook of every site
    (`hook_names`), the models' names across several models (`model_names`), the one hook
    name when every site reads the same hook, and the context size."""
    meta = crosscoder.cfg.metadata
    meta.extra[SITE_HOOKS_KEY] = list(hooks)
    names = [getattr(m, "name", None) for m in models]
    if len(models) > 1:
        meta.extra[MODELS_KEY] = names
    if meta.model_name is None:
        meta.model_name = names[0]
    if len(set(hooks)) == 1:
        meta.hook_name = hooks[0]
    meta.context_size = context_size
