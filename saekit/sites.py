"""Where an SAE sits in a model and which part of a hook's activation it reads: one place
for the evaluator, the splicing code, feature statistics and the activation store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from saekit.models.hooks import select_head

if TYPE_CHECKING:
    from saekit.saes.base import SAE


@dataclass(frozen=True)
class SAESite:
    """Where an SAE sits in the model: the hook it reads and the hook it reconstructs (the
    same hook unless it is a transcoder), and the attention head, for per-head SAEs."""

    hook_in: str
    hook_out: str
    head_index: int | None = None


def sae_site(sae: SAE, hook: str | None = None, hook_out: str | None = None) -> SAESite:
    """The SAE's site from its metadata; `hook` / `hook_out` override the metadata. An SAE
    that reads several sites at once has no one site: refused (`check_one_site`)."""
    check_one_site(sae)
    meta = sae.cfg.metadata
    hook_in = hook or meta.hook_name
    if not hook_in:
        raise ValueError(
            "the SAE's metadata has no hook_name, so it is unknown which activation it reads; "
            "set sae.cfg.metadata.hook_name or pass hook=..."
        )
    if sae.is_transcoder:
        out = hook_out or meta.hook_name_out
        if not out:
            raise ValueError(
                f"this {sae.architecture} reconstructs another hook than it reads, but its "
                "metadata has no hook_name_out; set sae.cfg.metadata.hook_name_out or pass "
                "hook_out=..."
            )
    else:
        out = hook_out or hook_in
    return SAESite(hook_in, out, meta.hook_head_index)


def check_one_site(
    sae: SAE, what: str | None = None, name: str | None = None, command_line: bool = False
) -> None:
    """Refuse an SAE that reads several sites at once (a cross-layer transcoder, a
    crosscoder) where one hook per SAE is expected, with one line naming the evaluation that
    takes it; nothing for any other SAE. `what` opens the message ("evaluate_saes takes SAEs
    that read one hook"); `name` is how the SAE is called there (e.g. its folder);
    `command_line` says that the evaluation is run from Python and where a training run
    left its figures."""
    if not sae.multi_site:
        return
    from saekit.saes.clt import CrossLayerTranscoder
    from saekit.saes.crosscoder import Crosscoder

    n = sae.cfg.n_layers
    if isinstance(sae, CrossLayerTranscoder):
        kind = f"a cross-layer transcoder over {n} layers"
        use = "saekit.evals.crosslayer.evaluate_clt(clt, model, token_batches)"
    elif isinstance(sae, Crosscoder):
        kind = f"a crosscoder over {n} sites"
        use = "saekit.evals.crosscoder.evaluate_crosscoder(crosscoder, model, token_batches, hooks)"
    else:
        kind = f"a {sae.architecture} over {n} sites"
        use = "the evaluation its architecture provides"
    subject = name or "this SAE"
    said = f"{subject} is {kind}, read all at once"
    opening = f"{what}, but {said}" if what else f"{said}, not one hook"
    if command_line:
        raise ValueError(
            f"{opening}; evaluate it from Python with {use}, or read the metrics.json of the "
            "saekit train run that made it (its held-out figures)"
        )
    raise ValueError(f"{opening}; evaluate it with {use}")


def activation_region(
    act: Tensor, head_index: int | None = None, keep_heads: bool = False
) -> Tensor:
    """The part of a hook's activation an SAE reads: one head of a per-head hook when
    `head_index` is given, and per-head activations [batch, pos, n_heads, d_head] flattened
    to [batch, pos, n_heads * d_head] unless the SAE flattens them itself (`keep_heads`)."""
    region = select_head(act, head_index)
    if region.ndim == 4 and not keep_heads:
        region = region.flatten(-2)
    return region


def sae_region(sae: SAE, act: Tensor, head_index: int | None) -> Tensor:
    """`activation_region` for `sae` (hook_z SAEs take the heads unflattened)."""
    return activation_region(act, head_index, keep_heads=reads_heads(sae))


def reads_heads(sae: SAE) -> bool:
    """Whether the SAE takes per-head activations [..., n_heads, d_head] as they are."""
    return sae.cfg.reshape_activations == "hook_z"
