"""The SAEs of a run of several: hooks from names, glob patterns and layer lists; sweeps
over SAE and training fields; seeds; per-SAE overrides; and each SAE's name, which is its
sub-folder of the run folder.

Everything here is pure bookkeeping on configs and hook names, so that every mistake is
found before a model loads (or, for hook patterns, right after it loads, before any text
is read).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from saekit.training.fields import coerce, suggest


class SweptConfig(Protocol):
    """What the planner reads of a `saekit.training.config.TrainConfig` (that module checks
    sweeps with this one, so this one names the config by what it uses)."""

    sections: ClassVar[dict[str, type]]
    setting_aliases: ClassVar[dict[str, tuple[str, ...]]]
    sae: Any
    data: Any
    training: Any
    run: Any
    sweep: dict[str, list[Any]]
    saes: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweptConfig: ...


#: Characters that make a hook name a glob pattern (fnmatch's).
GLOB_CHARS = "*?["
#: The hook a --layers run reads when no hook_name is given.
DEFAULT_LAYER_TEMPLATE = "blocks.{layer}.hook_resid_pre"
#: Sections whose fields may be swept or overridden per SAE.
SWEPT_SECTIONS = ("sae", "training")
#: Settings every SAE of a run shares, with the reason (said when one is swept).
SHARED: dict[str, str] = {
    "training.tokens": "every SAE of a run reads the same stream for the same number of tokens",
    "training.batch_size": "every SAE of a run trains on the same batches",
    "sae.init_from": "fine-tuning trains one SAE per run",
}
#: Keys a `saes:` entry may hold besides sae and training fields.
ENTRY_KEYS = ("hook_name", "hook_name_out", "seed", "name")
#: Separates the parts of an SAE's name (hook, swept values, seed).
NAME_SEPARATOR = "__"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,-]*$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=+,-]")
#: The longest sub-folder name (file systems allow 255 bytes).
MAX_NAME = 200


def is_pattern(name: str) -> bool:
    """Whether a hook name is a glob pattern (holds *, ? or [)."""
    return any(c in name for c in GLOB_CHARS)


def is_many(cfg: SweptConfig) -> bool:
    """Whether `cfg` trains several SAEs: several hook names or a pattern, layers, seeds, a
    sweep or a saes list (even when they come to one SAE, the run has the layout of many)."""
    hook = cfg.data.hook_name
    return (
        isinstance(hook, list)
        or (isinstance(hook, str) and is_pattern(hook))
        or cfg.data.layers is not None
        or bool(cfg.run.seeds)
        or bool(cfg.sweep)
        or bool(cfg.saes)
    )


# ----- layers and hooks ------------------------------------------------------------------


def parse_layers(spec: str) -> list[int]:
    """Layers from "0-11:2" (a range with both ends and a step), "3" and comma lists of
    these ("0,3,5-7"), in the order given; a ValueError says what is wrong."""
    hint = "write layers as 0-11 (both ends), 0-11:2 (every second) or 0,3,5-7"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"layers is empty; {hint}")
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if match is None:
            raise ValueError(f"layers {spec!r}: cannot read {part!r}; {hint}")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        step = int(match.group(3)) if match.group(3) is not None else 1
        if end < start or step < 1:
            raise ValueError(
                f"layers {spec!r}: {part!r} is an empty range (the end comes first or the "
                f"step is 0); {hint}"
            )
        out.extend(range(start, end + 1, step))
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise ValueError(f"layers {spec!r} name layer(s) {repeated} more than once")
    return out


def layer_template(hook_name: str | None) -> str:
    """The hook name with {layer} where the layer goes: `hook_name` itself when it holds
    {layer}, else with its one number between dots replaced (blocks.5.hook_resid_pre ->
    blocks.{layer}.hook_resid_pre); without a hook name, the residual stream."""
    if hook_name is None:
        return DEFAULT_LAYER_TEMPLATE
    if "{layer}" in hook_name:
        return hook_name
    parts = hook_name.split(".")
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    if len(numbers) != 1:
        raise ValueError(
            f"--layers cannot tell where the layer goes in hook {hook_name!r} (it has "
            f"{len(numbers)} numbers); write {{layer}} there, e.g. blocks.{{layer}}.hook_resid_pre"
        )
    parts[numbers[0]] = "{layer}"
    return ".".join(parts)


def _layer_key(name: str, order: dict[str, int]) -> tuple[int, int]:
    """Layer order: the first number between dots (names without one last), then the
    model's own order of its hooks."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    layer = int(found.group(1)) if found else 1 << 30
    return layer, order.get(name, 0)


def expand_hooks(
    hook_name: str | list[str] | None,
    layers: str | None,
    names: Sequence[str],
    default: str | None,
    model_desc: str = "the model",
) -> list[str]:
    """The hooks a run trains on, in order: each name as given; each glob pattern's matches
    in layer order; with `layers`, each name's template (see `layer_template`) for every
    layer. `default` stands for a missing hook_name (without layers). A hook found twice
    counts once; a pattern that matches nothing is a ValueError naming close hooks."""
    from saekit.models.hooks import unknown_hook_error

    given = [hook_name] if not isinstance(hook_name, list) else list(hook_name)
    if layers is not None:
        numbers = parse_layers(layers)
        given = [layer_template(h).replace("{layer}", str(n)) for h in given for n in numbers]
    elif given == [None]:
        if default is None:
            raise ValueError("no hook given and the model has no default; pass --hook-name")
        given = [default]
    valid = list(names)
    known = set(valid)
    order = {n: i for i, n in enumerate(valid)}
    out: list[str] = []
    for name in given:
        assert name is not None
        if "{layer}" in name:
            raise ValueError(f"hook {name!r} holds {{layer}}; give --layers to fill it in")
        if not is_pattern(name):
            if name not in known:
                raise unknown_hook_error(name, valid, model_desc)
            found = [name]
        else:
            found = sorted(
                (n for n in valid if fnmatch.fnmatchcase(n, name)),
                key=lambda n: _layer_key(n, order),
            )
            if not found:
                plain = re.sub(r"[*?\[\]]", "", name)
                close = difflib.get_close_matches(plain, valid, n=5, cutoff=0.4) or valid[:5]
                raise ValueError(
                    f"hook pattern {name!r} matches no hook of {model_desc}; close hook names: "
                    f"{', '.join(close)} (backend.hook_names() lists all {len(valid)})"
                )
        out.extend(n for n in found if n not in out)
    return out


# ----- sweeps and per-SAE entries -------------------------------------------------------


def read_sweep(value: Any) -> dict[str, list[Any]]:
    """A sweep as {field: [values]}, from a config file's mapping (a value or a list per
    field) or the command line's ["k=32,64", "lr=1e-3,3e-3"]. Values stay as given (strings
    from the command line); `variant_problems` reads them with each field's type."""
    if isinstance(value, (list, tuple)):
        out: dict[str, list[Any]] = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(
                    f"cannot read {item!r}; write each swept field as FIELD=V1,V2 "
                    "(e.g. --sweep k=32,64 expansion_factor=8,16)"
                )
            key, _, values = item.partition("=")
            key = key.strip()
            if key in out:
                raise ValueError(f"{key} is swept twice; give all its values once: {key}=V1,V2")
            out[key] = [v.strip() for v in values.split(",") if v.strip()]
        return _non_empty(out)
    if isinstance(value, dict):
        return _non_empty({
            str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in value.items()
        })
    raise ValueError(
        f"a sweep is a mapping of fields to lists of values, got {type(value).__name__}"
    )


def _non_empty(sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
    empty = [k for k, v in sweep.items() if not v]
    if empty:
        raise ValueError(f"no values given for {', '.join(empty)}; write FIELD=V1,V2")
    return sweep


def read_saes(value: Any) -> list[dict[str, Any]]:
    """A config file's `saes:` list: one mapping of overrides per SAE."""
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ValueError(
            "saes must be a list of mappings, one per SAE, e.g. [{k: 32}, {architecture: "
            "standard, sparsity_coefficient: 2}]"
        )
    return [dict(e) for e in value]


def field_setting(key: str, config_type: type[SweptConfig]) -> str:
    """The setting ("sae.k") a swept or overridden field names ("k" or "sae.k"); a
    ValueError for other sections' fields, unknown names and shared settings.
    `config_type` (TrainConfig) names the sections and the settings' other names."""
    sections = config_type.sections
    section, _, name = key.rpartition(".")
    names = {
        s: [f.name for f in dataclasses.fields(sections[s])] for s in SWEPT_SECTIONS
    }
    aliases = {
        alias: setting
        for setting, found in config_type.setting_aliases.items() for alias in found
        if setting.split(".")[0] in SWEPT_SECTIONS
    }
    if name in aliases and (not section or aliases[name].startswith(section + ".")):
        setting = aliases[name]
    elif section:
        if section not in SWEPT_SECTIONS or name not in names[section]:
            raise ValueError(
                f"{key!r} is not a field of the sae or training section; only those can "
                "vary between the SAEs of a run"
            )
        setting = key
    else:
        owners = [s for s in SWEPT_SECTIONS if name in names[s]]
        if not owners:
            every = [n for s in SWEPT_SECTIONS for n in names[s]]
            raise ValueError(
                f"{key!r} is not a field of the sae or training section{suggest(key, every)}"
            )
        setting = f"{owners[0]}.{name}"
    if setting in SHARED:
        raise ValueError(f"{setting.split('.')[1]} cannot vary between SAEs: {SHARED[setting]}")
    return setting


def _hint(setting: str, config_type: type[SweptConfig]) -> Any:
    section, name = setting.split(".")
    return typing.get_type_hints(config_type.sections[section])[name]


def _typed(setting: str, value: Any, config_type: type[SweptConfig]) -> Any:
    return coerce(value, _hint(setting, config_type))


def _type_of(setting: str, config_type: type[SweptConfig]) -> str:
    from saekit.training.fields import _type_name

    return _type_name(_hint(setting, config_type))


@dataclass(frozen=True)
class Variant:
    """One SAE of a run before hooks are crossed in: its settings and name parts."""

    settings: dict[str, Any]
    """Settings by name ("sae.k"), typed."""
    label: tuple[str, ...]
    """Name parts for what varies ("k=32", "seed=1")."""
    hooks: str | list[str] | None = None
    """A saes entry's own hook_name (replacing the run's), else None."""
    hook_out: str | None = None
    seed: int | None = None
    name: str | None = None
    """A saes entry's own name (then the label is not used)."""


def variants(cfg: SweptConfig) -> tuple[list[Variant], list[str]]:
    """Every (saes entry x swept combination x seed), and the problems found reading them."""
    problems: list[str] = []
    sweep: list[tuple[str, list[Any]]] = []
    for key, values in cfg.sweep.items():
        try:
            setting = field_setting(key, type(cfg))
        except ValueError as err:
            problems.append(f"sweep: {err}")
            continue
        try:
            typed = [_typed(setting, v, type(cfg)) for v in values]
        except (TypeError, ValueError):
            kind = _type_of(setting, type(cfg))
            problems.append(f"sweep: {key}: cannot read {values!r} as {kind}")
            continue
        if len({repr(v) for v in typed}) != len(typed):
            problems.append(f"sweep: {key} repeats a value in {values!r}")
        if any(setting == s for s, _ in sweep):
            problems.append(f"sweep: {setting} is swept twice (once by an alias)")
        sweep.append((setting, typed))
    entries: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i, entry in enumerate(cfg.saes or [{}]):
        settings, extras = {}, {}
        for key, value in entry.items():
            if key in ENTRY_KEYS:
                extras[key] = value
                continue
            try:
                setting = field_setting(key, type(cfg))
            except ValueError as err:
                problems.append(f"saes[{i}]: {err}")
                continue
            try:
                settings[setting] = _typed(setting, value, type(cfg))
            except (TypeError, ValueError):
                kind = _type_of(setting, type(cfg))
                problems.append(f"saes[{i}]: {key}: cannot read {value!r} as {kind}")
        clash = sorted(set(settings) & {s for s, _ in sweep})
        if clash:
            problems.append(f"saes[{i}] sets {', '.join(clash)}, which the sweep varies")
        name = extras.get("name")
        if name is not None and not (isinstance(name, str) and safe_name(name)):
            problems.append(
                f"saes[{i}].name {name!r} is not a safe folder name: use letters, digits "
                f"and . _ = + , - (not first), at most {MAX_NAME} characters"
            )
        seed = extras.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**32):
            problems.append(f"saes[{i}].seed must be a whole number in [0, 2**32), got {seed!r}")
        if seed is not None and cfg.run.seeds:
            problems.append(f"saes[{i}] sets a seed, and run.seeds gives every SAE one")
        entries.append((settings, extras))
    if problems:
        return [], problems
    several_entries = len(entries) > 1
    out: list[Variant] = []
    combos = list(itertools.product(*(v for _, v in sweep))) if sweep else [()]
    seeds: list[int | None] = list(cfg.run.seeds) if cfg.run.seeds else [None]
    for settings, extras in entries:
        base_label: tuple[str, ...] = ()
        if several_entries and extras.get("name") is None:
            base_label = tuple(f"{_short(k)}={_show(v)}" for k, v in settings.items())
        for combo in combos:
            swept = {s: v for (s, _), v in zip(sweep, combo, strict=True)}
            label = base_label + tuple(f"{_short(s)}={_show(v)}" for s, v in swept.items())
            for seed in seeds:
                chosen = seed if seed is not None else extras.get("seed")
                out.append(Variant(
                    {**settings, **swept},
                    label + ((f"seed={chosen}",) if chosen is not None else ()),
                    extras.get("hook_name"),
                    extras.get("hook_name_out"),
                    chosen,
                    extras.get("name"),
                ))
    return out, []


def _short(setting: str) -> str:
    return setting.split(".", 1)[1]


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_show(v) for v in value)
    return str(value)


def safe_name(name: str) -> bool:
    """Whether `name` can be a sub-folder of the run folder as it is: no separator, no
    leading dot, nothing a shell or file system reads specially."""
    return bool(_SAFE_NAME.match(name)) and len(name) <= MAX_NAME and name not in (".", "..")


def sae_name(hook: str, variant: Variant) -> str:
    """The SAE's sub-folder name: the hook, then what varies, joined by `NAME_SEPARATOR`;
    a saes entry's own name (after the hook) when it has one. Characters a folder name
    should not hold become _."""
    parts = [_UNSAFE_CHARS.sub("_", hook)]
    if variant.name is not None:
        parts.append(variant.name)
        parts.extend(p for p in variant.label if p.startswith("seed="))
    else:
        parts.extend(_UNSAFE_CHARS.sub("_", p) for p in variant.label)
    name = NAME_SEPARATOR.join(parts).lstrip("._-") or "sae"
    return name[:MAX_NAME]


def variant_config(
    cfg: SweptConfig, variant: Variant, hook: str | None, out: str
) -> SweptConfig:
    """The one-SAE config of `variant` at `hook` (None: the run's default hook), written to
    `out`: what `saekit train --config` would train alone."""
    data = cfg.to_dict()
    data.pop("sweep", None)
    data.pop("saes", None)
    data["data"]["hook_name"] = hook
    data["data"]["layers"] = None
    if variant.hook_out is not None:
        data["data"]["hook_name_out"] = variant.hook_out
    data["run"]["seeds"] = None
    data["run"]["out"] = out
    if variant.seed is not None:
        data["run"]["seed"] = variant.seed
    for setting, value in variant.settings.items():
        section, name = setting.split(".")
        data[section][name] = value
    return type(cfg).from_dict(data)


def variant_problems(cfg: SweptConfig) -> list[str]:
    """Every problem of the sweep and saes entries, and of each SAE's config, found before
    any model loads (hooks are checked once the model is there)."""
    from saekit.training.fields import ConfigError

    found, problems = variants(cfg)
    if problems:
        return problems
    for variant in found:
        try:
            variant_config(cfg, variant, None, cfg.run.out)
        except ConfigError as err:
            label = variant.name or ", ".join(variant.label) or "the SAE"
            problems.extend(f"{label}: {p}" for p in err.problems if p not in problems)
    return problems


@dataclass
class SAEPlan:
    """One SAE of a run of several: its name (sub-folder), hook and one-SAE config."""

    name: str
    hook: str
    config: SweptConfig
    settings: dict[str, Any]
    """What was swept or overridden for it ("sae.k": 32), for the summary."""
    seed: int


def plan_saes(
    cfg: SweptConfig, names: Sequence[str], default_hook: str | None, model_desc: str
) -> list[SAEPlan]:
    """Every SAE of the run, in order (hooks in layer order, then swept values, then
    seeds), with unique, safe names; a ValueError for anything wrong."""
    found, problems = variants(cfg)
    if problems:
        from saekit.training.fields import ConfigError

        raise ConfigError(problems)
    run_hooks = expand_hooks(cfg.data.hook_name, cfg.data.layers, names, default_hook,
                             model_desc)
    per_variant = []
    for variant in found:
        hooks = run_hooks
        if variant.hooks is not None:
            hooks = expand_hooks(variant.hooks, cfg.data.layers, names, default_hook,
                                 model_desc)
        per_variant.append((variant, hooks))
    plans: list[SAEPlan] = []
    seen: dict[str, str] = {}
    order = {h: i for i, h in enumerate(run_hooks)}
    # Hooks first (in layer order), then the variants in the order they were given.
    pairs = sorted(
        ((hook, i, v) for i, (v, hooks) in enumerate(per_variant) for hook in hooks),
        key=lambda t: (order.get(t[0], len(order)), t[1]),
    )
    for hook, _, variant in pairs:
        name = sae_name(hook, variant)
        if not safe_name(name):
            raise ValueError(f"SAE name {name!r} is not a safe folder name; name it in saes")
        if name in seen:
            raise ValueError(
                f"two SAEs of the run would both be named {name!r} (both at {hook}); give "
                "the saes entries different settings or a name each"
            )
        seen[name] = hook
        out = str(Path(cfg.run.out) / name)
        config = variant_config(cfg, variant, hook, out)
        settings = dict(variant.settings)
        plans.append(SAEPlan(name, hook, config, settings, config.run.seed))
    return plans
