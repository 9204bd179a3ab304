"""Steering: add latents' decoder directions to the model's activations, and generate text.

`steering_hooks(sae, {latent: coefficient})` gives `{hook: fn}` that adds
sum_i coefficient_i * W_dec[i] at the SAE's output hook; pass it to
`SplicedModel.run_with_hooks` or to `generate`. No SAE needs to be attached to steer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.analysis.generation import check_generation, sample
from saekit.analysis.interventions import Positions, position_mask
from saekit.analysis.splice import HookFn, HookSpec, SplicedModel
from saekit.analysis.splice_step import hook_lists
from saekit.saes.base import SAE
from saekit.sites import sae_site


def steering_vector(sae: SAE, latents: Mapping[int, float], normalize: bool = False) -> Tensor:
    """sum_i c_i * W_dec[i] over {latent i: coefficient c_i} -> [d_out].

    With `normalize`, each decoder row is first scaled to unit norm, so a coefficient is a
    length in activation units whatever the row's norm.
    """
    if not latents:
        raise ValueError("name at least one latent to steer with, as {latent: coefficient}")
    index = torch.tensor([int(i) for i in latents], device=sae.device)
    bad = [int(i) for i in index if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"latents {bad} are out of range for an SAE of {sae.cfg.d_sae} latents")
    rows = sae.W_dec.detach()[index]  # [n, d_out]
    if normalize:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    coeffs = torch.tensor([float(c) for c in latents.values()], device=sae.device)
    return coeffs.to(rows.dtype) @ rows


def steering_hooks(
    sae: SAE,
    latents: Mapping[int, float],
    *,
    positions: Positions = None,
    normalize: bool = False,
    hook: str | None = None,
) -> dict[str, HookFn]:
    """{hook: fn} adding `steering_vector(sae, latents)` at the SAE's output hook.

    `positions` picks the sequence positions steered (all when None); `hook` overrides the
    hook from the SAE's metadata. Per-head SAEs steer their head only.
    """
    site = sae_site(sae, hook if not sae.is_transcoder else None, hook)
    vector = steering_vector(sae, latents, normalize)
    head = site.head_index

    def add(act: Tensor) -> Tensor:
        region = act if head is None else act[:, :, head]
        direction = vector.to(device=act.device, dtype=act.dtype)
        if region.ndim == 4:  # a per-head hook read flat: [batch, pos, n_heads, d_head]
            direction = direction.reshape(region.shape[-2:])
        mask = position_mask(positions, act.shape[0], act.shape[1], act.device)
        mask = mask.reshape(*mask.shape, *([1] * (region.ndim - 2)))
        new = region + mask.to(act.dtype) * direction
        if head is None:
            return new
        out = act.clone()
        out[:, :, head] = new
        return out

    return {site.hook_out: add}


class Generation(NamedTuple):
    """What `generate` returns."""

    tokens: Tensor
    """Prompt and generated tokens [batch, pos]."""
    text: list[str]
    """The generated continuation of each row, decoded (empty strings without a tokenizer)."""


def generate(
    model: SplicedModel | Any,
    prompt: str | Tensor,
    max_new_tokens: int = 20,
    *,
    fwd_hooks: HookSpec = (),
    temperature: float = 0.0,
    seed: int | None = None,
    prepend_bos: bool = True,
) -> Generation:
    """Generate with the model's SAEs spliced in and `fwd_hooks` applied at every step.

    `prompt` is text (tokenized with the model's tokenizer, BOS first when `prepend_bos`)
    or tokens [batch, pos]. Greedy at temperature 0, sampling otherwise (seeded by `seed`).
    The whole sequence is re-run at each step: simple and exact for short generations.
    """
    if not isinstance(model, SplicedModel):
        model = SplicedModel(model)
    check_generation(max_new_tokens, temperature)
    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass tokens [batch, pos] instead")
        ids = tokenizer(prompt)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        if prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        tokens = torch.tensor([ids], dtype=torch.long)
    else:
        tokens = prompt if prompt.ndim == 2 else prompt.unsqueeze(0)
    n_prompt = tokens.shape[1]
    hooks = hook_lists(fwd_hooks, model.hook_names())
    tokens = sample(
        lambda t: model._forward(t, hooks, None), tokens, max_new_tokens,
        do_sample=temperature > 0, temperature=temperature, seed=seed,
    )
    text = (
        [tokenizer.decode(row[n_prompt:].tolist()) for row in tokens]
        if tokenizer is not None else ["" for _ in range(tokens.shape[0])]
    )
    return Generation(tokens, text)
