"""What the probing evaluations share: logistic probes, latent selection, SAE latents pooled
per text, and pooled activations with chosen latents ablated.

Probes are scikit-learn's `LogisticRegression` with SAEBench's sparse-probing settings (L2,
C = 1, up to 1,000 iterations) on activations mean-pooled over each text's own tokens.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from saekit.evals.context import TextActivations
from saekit.saes.base import SAE
from saekit.sites import reads_heads

#: Latents' decoder rows computed at once when building the effective decoder (memory:
#: rows x d_sae floats).
_DECODER_BLOCK_FLOATS = 1 << 24


def fit_probe(x: np.ndarray, y: np.ndarray, l1_c: float | None = None) -> object:
    """A logistic-regression probe fitted on features x [n, m] and 0/1 labels y [n]: L2,
    C = 1 (SAEBench's sparse probes), or, with `l1_c`, an L1 penalty of inverse strength
    `l1_c` (SCR / TPP, whose SAEBench probes carry an L1 penalty)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    if l1_c is None:
        probe = LogisticRegression(C=1.0, max_iter=1000)
    else:
        # liblinear penalises the intercept like a weight; a large intercept_scaling makes
        # that penalty negligible (a probe forced through the origin misreads non-negative
        # latents once some are ablated).
        probe = LogisticRegression(
            l1_ratio=1.0, C=l1_c, solver="liblinear", intercept_scaling=100.0, max_iter=1000,
            random_state=0,
        )
    # Multi-threaded BLAS on matrices this small is 10-30x slower than one thread.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Separable data never "converges" (the weights grow forever); the accuracy is what
        # is read, and it has settled long before the iteration cap.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(x, dtype=np.float32), y)
    return probe


def probe_accuracy(probe: object, x: np.ndarray, y: np.ndarray) -> float:
    """The share of rows of x [n, m] whose predicted label equals y [n]."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        predicted = probe.predict(np.asarray(x, dtype=np.float32))  # type: ignore[attr-defined]
    return float(np.mean(predicted == y))


def probe_direction(probe: object) -> np.ndarray:
    """The probe's weight vector [m] (its logit grows along it)."""
    return np.asarray(probe.coef_, dtype=np.float64).reshape(-1)  # type: ignore[attr-defined]


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k features whose class means differ most (absolute difference), largest
    first; ties go to the lower index."""
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def probe_task_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test accuracy of a probe fitted on the training rows."""
    return probe_accuracy(fit_probe(x_train, y_train), x_test, y_test)


def _sae_input(sae: SAE, x: Tensor) -> Tensor:
    """x [..., d_in] in the layout `sae.encode` takes: per-head SAEs flatten their input
    themselves, and any split of d_in into heads flattens to the same vector."""
    x = x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return x.unsqueeze(-2) if reads_heads(sae) else x


def _flat(sae: SAE, recon: Tensor) -> Tensor:
    return recon.flatten(-2) if reads_heads(sae) else recon


@torch.no_grad()
def pooled_latents(
    sae: SAE,
    acts: TextActivations,
    rows: np.ndarray | None = None,
    batch_size: int = 32,
    progress: bool | None = False,
) -> np.ndarray:
    """The SAE's latents, encoded token by token and mean-pooled over each text's own tokens:
    [len(rows), d_sae] (all texts when `rows` is None)."""
    from saekit.progress import bar

    index = np.arange(acts.acts.shape[0]) if rows is None else np.asarray(rows)
    out = []
    shown = bar(desc="SAE latents", unit="text", total=len(index), progress=progress)
    with shown:
        for start in range(0, len(index), batch_size):
            chunk = torch.as_tensor(index[start : start + batch_size])
            part = TextActivations(acts.acts[chunk], acts.tokens[chunk], acts.mask[chunk])
            latents = sae.encode(_sae_input(sae, part.acts)).float().cpu()  # [b, pos, d_sae]
            out.append(part.mean_pooled(latents))
            shown.update(len(chunk))
    if not out:
        return np.zeros((0, sae.cfg.d_sae), dtype=np.float32)
    return torch.cat(out).numpy()


def decodes_linearly(sae: SAE) -> bool:
    """Whether a latent's contribution to the reconstruction is the same vector at every
    token (no per-token input normalisation), so ablations can be computed on pooled latents."""
    return sae.cfg.normalize_activations == "none"


@torch.no_grad()
def effective_decoder(sae: SAE) -> np.ndarray:
    """What one unit of each latent adds to the reconstruction: [d_sae, d_in].

    It is `decode(e_i) - decode(0)`, which is W_dec's row for most SAEs and accounts for any
    rescaling the architecture's decoder applies. For SAEs that normalise each input, the
    vector varies per token; W_dec's rows are returned then (they rank latents the same way)."""
    if not decodes_linearly(sae):
        return sae.W_dec.detach().float().cpu().numpy()
    d_sae = sae.cfg.d_sae
    block = max(1, _DECODER_BLOCK_FLOATS // d_sae)
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    base = _flat(sae, sae.decode(torch.zeros(1, d_sae, device=device, dtype=dtype))).float()
    rows = []
    for start in range(0, d_sae, block):
        stop = min(start + block, d_sae)
        unit = torch.zeros(stop - start, d_sae, device=device, dtype=dtype)
        unit[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        rows.append((_flat(sae, sae.decode(unit)).float() - base).cpu())
    return torch.cat(rows).numpy()


class Ablator:
    """Pooled activations of some texts with chosen latents' contributions taken out of every
    token: x - (decode(f) - decode(f with those latents zeroed)), the SAE's error term kept,
    then mean-pooled over each text's own tokens (SAEBench's ablation at the probe's layer).

    For SAEs without per-token normalisation the change is linear in the latents, so it is
    computed exactly from pooled latents: pooled(f)[:, S] @ D[S] with D the effective decoder.
    Otherwise every token is decoded again."""

    def __init__(
        self,
        sae: SAE,
        acts: TextActivations,
        rows: np.ndarray,
        batch_size: int = 32,
        latents: np.ndarray | None = None,
    ) -> None:
        """`rows`: the texts of `acts` to ablate; `latents`: their pooled latents when
        already computed ([len(rows), d_sae])."""
        self.sae = sae
        self.rows = np.asarray(rows)
        self.batch_size = batch_size
        self.acts = acts
        index = torch.as_tensor(self.rows)
        part = TextActivations(acts.acts[index], acts.tokens[index], acts.mask[index])
        self.clean = part.mean_pooled().numpy()  # [rows, d_in]
        self.linear = decodes_linearly(sae)
        if self.linear:
            if latents is None:
                latents = pooled_latents(sae, acts, self.rows, batch_size)
            self.latents = np.asarray(latents, dtype=np.float64)
            self.decoder = effective_decoder(sae).astype(np.float64)

    def ablated(self, latents: np.ndarray) -> np.ndarray:
        """Pooled activations [rows, d_in] with `latents` (indices) ablated."""
        latents = np.asarray(latents, dtype=np.int64)
        if latents.size == 0:
            return self.clean.copy()
        if self.linear:
            delta = self.latents[:, latents] @ self.decoder[latents]
            return (self.clean - delta).astype(np.float32)
        return self._ablated_per_token(latents)

    @torch.no_grad()
    def _ablated_per_token(self, latents: np.ndarray) -> np.ndarray:
        sae = self.sae
        out = []
        for start in range(0, len(self.rows), self.batch_size):
            chunk = torch.as_tensor(self.rows[start : start + self.batch_size])
            part = TextActivations(
                self.acts.acts[chunk], self.acts.tokens[chunk], self.acts.mask[chunk]
            )
            f = sae.encode(_sae_input(sae, part.acts))  # [b, pos, d_sae]; sets any norm state
            kept = f.clone()
            kept[..., torch.as_tensor(latents, device=f.device)] = 0.0
            delta = _flat(sae, sae.decode(f)) - _flat(sae, sae.decode(kept))  # [b, pos, d_in]
            out.append(part.mean_pooled(part.acts - delta.float().cpu()))
        return torch.cat(out).numpy()
