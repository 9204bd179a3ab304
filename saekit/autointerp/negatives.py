"""Non-activating contexts: windows of held-out text on which a latent does not fire at all.

The feature statistics keep only activating contexts, so detection's negatives come from one
more pass of the model: random non-overlapping windows (as wide as the statistics' windows,
free of special tokens) and, for each window, which latents fire anywhere in it. That is
[windows, d_sae] booleans, a few megabytes for thousands of latents, saved beside the run so
that a resumed run shows the scorers exactly the same contexts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.autointerp.contexts import Context

NEGATIVES_FILE = "autointerp_negatives.safetensors"


@dataclass
class NegativePool:
    """Windows of text and which latents fire anywhere in each."""

    tokens: Tensor
    """[n_windows, width] token ids."""
    fires: Tensor
    """[n_windows, d_sae] True where the latent fires somewhere in the window."""

    @property
    def d_sae(self) -> int:
        return self.fires.shape[1]

    def for_latent(self, latent: int, n: int, seed: int = 0) -> list[Context]:
        """Up to `n` windows on which `latent` never fires, drawn at random (seeded by
        `seed` and the latent, so a rerun draws the same ones)."""
        quiet = (~self.fires[:, latent]).nonzero().flatten().tolist()
        rng = random.Random(f"negatives:{seed}:{latent}")
        chosen = sorted(rng.sample(quiet, min(n, len(quiet))))
        width = self.tokens.shape[1]
        return [Context(tuple(self.tokens[i].tolist()), (0.0,) * width) for i in chosen]

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / NEGATIVES_FILE
        save_file(
            {"tokens": self.tokens.contiguous(), "fires": self.fires.to(torch.uint8)}, str(path)
        )
        return path

    @staticmethod
    def load(folder: str | Path) -> NegativePool:
        from safetensors.torch import load_file

        path = Path(folder) / NEGATIVES_FILE
        try:
            t = load_file(str(path))
            return NegativePool(t["tokens"], t["fires"].bool())
        except (KeyError, OSError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"{path} is not a saved pool of non-activating contexts ({err}); delete it "
                "and run again to rebuild it"
            ) from err


@torch.no_grad()
def negative_pool(
    sae: Any,
    model: Any,
    token_batches: Iterable[Tensor],
    *,
    width: int,
    n_windows: int = 512,
    seed: int = 0,
    progress: bool | None = None,
) -> NegativePool:
    """Up to `n_windows` windows of `width` tokens from `token_batches` ([batch, pos] each),
    with the latents of `sae` that fire in each. `model` is a backend or anything
    `load_model` takes."""
    from saekit.data.tokens import keep_mask, special_token_ids
    from saekit.models import load_model
    from saekit.progress import bar
    from saekit.sites import sae_region, sae_site

    if width < 1 or n_windows < 1:
        raise ValueError(f"width and n_windows must be >= 1, got {width}, {n_windows}")
    backend = load_model(model)
    site = sae_site(sae)
    specials = special_token_ids(backend.tokenizer)
    generator = torch.Generator().manual_seed(seed)
    tokens_kept: list[Tensor] = []
    fires_kept: list[Tensor] = []
    found = 0
    with bar(desc="non-activating contexts", unit="window", total=n_windows,
             progress=progress) as shown:
        for tokens in token_batches:
            if found >= n_windows:
                break
            act = backend.activations(tokens, [site.hook_in])[site.hook_in]
            latents = sae.encode(sae_region(sae, act, site.head_index).to(sae.device))
            latents = latents.detach().float().cpu()  # [batch, pos, d_sae]
            tokens = tokens.cpu()
            keep = keep_mask(tokens, specials)
            n_pos = tokens.shape[1]
            for row in range(tokens.shape[0]):
                # A random phase per row, then windows side by side: none overlaps another.
                start = int(torch.randint(0, width, (1,), generator=generator))
                for s in range(start, n_pos - width + 1, width):
                    if found >= n_windows or not bool(keep[row, s:s + width].all()):
                        continue
                    tokens_kept.append(tokens[row, s:s + width])
                    fires_kept.append((latents[row, s:s + width] > 0).any(dim=0))
                    found += 1
                    shown.update(1)
    if not tokens_kept:
        raise ValueError(
            f"no window of {width} tokens without special tokens was found in the text; give "
            "more text, or longer sequences (context size)"
        )
    return NegativePool(torch.stack(tokens_kept), torch.stack(fires_kept))
