"""The feature-density plot: a histogram of log10 firing frequency per latent."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


def plot_feature_density(
    firing_frequency: Tensor, path: str | Path, title: str = "feature density", bins: int = 50
) -> Path:
    """Write the log10 firing-frequency histogram of one SAE's latents to `path` (PNG).

    Dead latents are counted in the title rather than drawn at log10(0) = -inf.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    freq = firing_frequency.detach().double().cpu()
    alive = freq[freq > 0]
    dead = int((freq == 0).sum())
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        if alive.numel():
            ax.hist(alive.log10().numpy(), bins=bins, color="tab:blue")
        ax.set_xlabel("log10 firing frequency")
        ax.set_ylabel("latents")
        ax.set_title(f"{title}\n{dead} of {freq.numel()} latents dead")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
