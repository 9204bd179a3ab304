"""Plots: the feature-density histogram, and `png_figure`, which every evaluation's plot
draws in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor


@contextmanager
def png_figure(path: str | Path, *grid: int, **options: Any) -> Iterator[tuple[Any, Any]]:
    """`with png_figure(path, 1, 2, figsize=(10, 4)) as (fig, axes):` draw; the figure (from
    `plt.subplots(*grid, **options)`, off-screen) is laid out and written to `path` as a PNG
    when the block ends, and closed whether or not drawing succeeded."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **options)
    try:
        yield fig, axes
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_feature_density(
    firing_frequency: Tensor, path: str | Path, title: str = "feature density", bins: int = 50
) -> Path:
    """Write the log10 firing-frequency histogram of one SAE's latents to `path` (PNG).

    Dead latents are counted in the title rather than drawn at log10(0) = -inf.
    """
    freq = firing_frequency.detach().double().cpu()
    alive = freq[freq > 0]
    dead = int((freq == 0).sum())
    with png_figure(path, figsize=(6, 4)) as (fig, ax):
        if alive.numel():
            ax.hist(alive.log10().numpy(), bins=bins, color="tab:blue")
        ax.set_xlabel("log10 firing frequency")
        ax.set_ylabel("latents")
        ax.set_title(f"{title}\n{dead} of {freq.numel()} latents dead")
    return Path(path)
