"""Which sites a cross-layer transcoder or crosscoder run reads, from its TrainConfig.

`saekit train --architecture clt` spans layers: `data.layers` chooses them (default: every
layer), `data.hook_name` and `data.hook_name_out` are the per-layer input and output hooks
written as templates (`blocks.{layer}.hook_resid_mid`, or one layer's name such as
`blocks.0.hook_resid_mid`, whose layer number is the one replaced). `--architecture
crosscoder` reads several hooks of one model (hook names, a glob pattern or `--layers`, as a
run of several SAEs would) or one hook of two models (`data.model_b`: model diffing).

`multisite_problems` finds what is wrong with such a config before any work;
`plan_sites` turns it into hooks once the model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol


class PlannedConfig(Protocol):
    """What the planner reads of a run's config (`saekit.training.config.TrainConfig`, which
    calls the planner while it validates itself, so it is named here by its parts)."""

    sae: Any
    data: Any
    run: Any
    saes: Any
    sweep: Any

#: The rules whose sparsity is k (latents kept per token), for every multi-site architecture.
K_RULES = ("topk", "batchtopk")
#: Where a CLT reads and writes each layer unless hook_name / hook_name_out say otherwise:
#: the MLP's input and output (the published CLTs' choice; `saekit.saes.clt`).
CLT_INPUT_TEMPLATE = "blocks.{layer}.ln2.hook_normalized"
CLT_OUTPUT_TEMPLATE = "blocks.{layer}.hook_mlp_out"


def is_multisite(architecture: str) -> bool:
    """Whether the registered `architecture` reads several sites at once."""
    from saekit.saes import architecture_class

    try:
        return bool(architecture_class(architecture).multi_site)
    except ValueError:
        return False


def is_clt(architecture: str) -> bool:
    """Whether `architecture` is a cross-layer transcoder (it reads inputs and writes
    outputs at every layer, rather than reconstructing what it reads)."""
    from saekit.saes import architecture_class

    return is_multisite(architecture) and architecture_class(architecture).is_transcoder


def rules_of(architecture: str) -> tuple[str, ...]:
    """The latents' rules (`activation_fn`) a multi-site architecture takes; () for others."""
    from saekit.saes import architecture_class
    from saekit.saes.clt import CLT_ACTIVATIONS, CrossLayerTranscoder
    from saekit.saes.crosscoder import CROSSCODER_ACTIVATIONS, Crosscoder

    cls = architecture_class(architecture)
    if issubclass(cls, CrossLayerTranscoder):
        return CLT_ACTIVATIONS
    if issubclass(cls, Crosscoder):
        return CROSSCODER_ACTIVATIONS
    return ()


def default_rule(architecture: str) -> str | None:
    """The rule an architecture's config defaults name (topk for clt, relu for crosscoder)."""
    from saekit.saes import architecture_class

    return architecture_class(architecture).config_defaults(1, 1).get("activation_fn")


def sets_k(architecture: str, rule: str | None) -> bool:
    """Whether a multi-site SAE of this rule (None: the default one) keeps k per token."""
    return (rule or default_rule(architecture)) in K_RULES


def multisite_problems(cfg: PlannedConfig) -> list[str]:
    """Every setting of `cfg` that a CLT or crosscoder run cannot follow, or a setting meant
    for them given to another architecture (empty when all is well)."""
    from saekit.training.sweeps import is_pattern, parse_layers

    arch, data, run = cfg.sae.architecture, cfg.data, cfg.run
    if not (isinstance(arch, str) and is_multisite(arch)):
        if data.model_b is not None:
            return [
                f"model_b is the second model of a crosscoder (model diffing), not of "
                f"{arch!r}; add --architecture crosscoder or leave --model-b out"
            ]
        return []
    out: list[str] = []
    refused = {
        "run.seeds": bool(run.seeds), "sweep": bool(cfg.sweep), "saes": bool(cfg.saes),
        "sae.init_from": cfg.sae.init_from is not None,
        "data.activations": data.activations is not None,
        "run.eval_every": run.eval_every is not None,
        "sae.matryoshka_widths": cfg.sae.matryoshka_widths is not None,
    }
    for name, given in refused.items():
        if given:
            out.append(
                f"{name} is not available for {arch!r}, which trains one SAE over several "
                f"sites from the model; leave {name.split('.')[-1]} out"
            )
    if run.parallel == "sae":
        out.append(
            f"parallel 'sae' deals the SAEs of a run out across ranks, but a {arch!r} run "
            "trains one; use parallel 'data' (the default) under torchrun"
        )
    hook, layers = data.hook_name, data.layers
    several_hooks = isinstance(hook, list) or (isinstance(hook, str) and is_pattern(hook))
    try:
        n_layers = len(parse_layers(layers)) if isinstance(layers, str) else None
    except ValueError:
        n_layers = None  # DataSection reports the bad spec
    if is_clt(arch):
        if data.model_b is not None:
            out.append(
                f"model_b is for crosscoders (model diffing); a {arch!r} reads one model"
            )
        if several_hooks:
            out.append(
                f"a {arch!r} takes one input hook per layer, written as a template: give "
                "--layers (e.g. 0-3) and, if not the MLP input, --hook-name "
                "blocks.{layer}.hook_resid_mid, not several names or a glob pattern"
            )
        if n_layers == 1:
            out.append(
                f"a {arch!r} over one layer is a per-layer transcoder; give --layers two or "
                "more layers, or train --architecture transcoder"
            )
        return out
    if data.model_b is not None:
        if several_hooks or layers is not None:
            out.append(
                "with model_b a crosscoder reads one hook in each model; give one --hook-name "
                "(or none for the middle residual stream), not several, a pattern or --layers"
            )
        return out
    if n_layers == 1 or (not several_hooks and layers is None):
        out.append(
            f"a {arch!r} reads several sites: give several hooks (--hook-name with several "
            "names or a glob such as 'blocks.*.hook_resid_pre', or --layers 0-3) or a second "
            "model with --model-b for model diffing"
        )
    return out


@dataclass
class SitePlan:
    """The sites of a multi-site run, once the model is known."""

    hooks_in: list[str]
    """Per site (crosscoder) or per layer (CLT): the hook read, as the model names it."""
    hooks_out: list[str] | None
    """CLT: per layer, the hook reconstructed; None for a crosscoder."""
    keys_in: list[str]
    """The names the activation stream uses for `hooks_in` (model diffing: `<i>/<hook>`)."""
    keys_out: list[str] | None
    """Likewise for `hooks_out`."""


def plan_sites(cfg: PlannedConfig, names: list[str], names_b: list[str] | None,
               default_hook: str | None, model_desc: str) -> SitePlan:
    """The run's sites on a model with hooks `names` (and `names_b`, model b's, for model
    diffing); every hook is checked to exist, with close names suggested when not."""
    from saekit.models.hooks import unknown_hook_error
    from saekit.training.sweeps import expand_hooks, layer_template

    data = cfg.data
    if is_clt(cfg.sae.architecture):
        assert not isinstance(data.hook_name, list)  # refused by multisite_problems
        template_in = layer_template(data.hook_name) if data.hook_name else CLT_INPUT_TEMPLATE
        template_out = (
            layer_template(data.hook_name_out) if data.hook_name_out else CLT_OUTPUT_TEMPLATE
        )
        if data.layers is not None:
            from saekit.training.sweeps import parse_layers

            layers = parse_layers(data.layers)
        else:
            layers = _every_layer(template_in, names)
            missing = [t for n in layers if (t := template_out.replace("{layer}", str(n)))
                       not in set(names)]
            if missing:
                raise unknown_hook_error(missing[0], names, model_desc)
            if len(layers) < 2:
                raise ValueError(
                    f"{model_desc} has {len(layers)} layer(s) with hook {template_in}; a "
                    "cross-layer transcoder spans two or more: check --hook-name, or train a "
                    "transcoder"
                )
        hooks_in = [template_in.replace("{layer}", str(n)) for n in layers]
        hooks_out = [template_out.replace("{layer}", str(n)) for n in layers]
        known = set(names)
        for hook in hooks_in + hooks_out:
            if hook not in known:
                raise unknown_hook_error(hook, names, model_desc)
        return SitePlan(hooks_in, hooks_out, hooks_in, hooks_out)
    if names_b is not None:
        hooks = expand_hooks(data.hook_name, None, names, default_hook, model_desc)
        if len(hooks) != 1:
            raise ValueError(
                f"with --model-b a crosscoder reads one hook in each model, but "
                f"{data.hook_name!r} names {len(hooks)} hooks ({', '.join(hooks[:4])}...); "
                "give one hook name"
            )
        if hooks[0] not in set(names_b):
            raise unknown_hook_error(hooks[0], names_b, f"--model-b {data.model_b}")
        keys = [f"{i}/{hooks[0]}" for i in range(2)]
        return SitePlan([hooks[0]] * 2, None, keys, None)
    hooks = expand_hooks(data.hook_name, data.layers, names, default_hook, model_desc)
    if len(hooks) < 2:
        raise ValueError(
            f"{data.hook_name!r} names one hook of {model_desc} ({hooks[0]}), but a crosscoder "
            "reads several sites; give several hooks (or --layers), or a second model with "
            "--model-b"
        )
    return SitePlan(hooks, None, hooks, None)


def _every_layer(template: str, names: list[str]) -> list[int]:
    """The layers n, in order, for which the model has the template's hook."""
    pattern = re.compile(re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def site_model_names(backends: list[Any], names: list[str | None]) -> list[str]:
    """Each model's name for the SAE's metadata: the backend's, else the one configured."""
    return [str(getattr(b, "name", None) or n) for b, n in zip(backends, names, strict=True)]
