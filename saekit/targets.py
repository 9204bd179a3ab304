"""An SAE from whatever a user names on the command line or in a config: a saved folder, a
folder laid out like a published repo, `RELEASE/SAE_ID` from the registry, or a Hub repo."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saekit.models.backend import ModelBackend
from saekit.saes.base import SAE

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


#: Metadata the commands use, and the kinds of value each may hold.
_METADATA_KINDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "model_name": ("a string", (str,)),
    "hook_name": ("a string", (str,)),
    "hook_name_out": ("a string", (str,)),
    "hook_head_index": ("an integer", (int,)),
    "context_size": ("an integer", (int,)),
    "prepend_bos": ("true or false", (bool,)),
    "dataset_path": ("a string", (str,)),
}


def load_target(target: str, device: str) -> SAE:
    """An SAE from a saved folder, `RELEASE/SAE_ID` (registry), or a Hub repo
    (`owner/name` or `owner/name/folder/inside/repo`). A target that looks like a path
    (`./x`, `runs/typo` where `runs/` exists) and is not there is "no such folder", not a
    Hub lookup."""
    from saekit.io.native import CFG_FILE

    path = Path(target).expanduser()
    where = str(path / CFG_FILE) if path.is_dir() else target
    try:
        sae = _load_target(target, device)
    except (TypeError, AttributeError, KeyError) as err:
        # A config value of the wrong type that the config classes let through: name the
        # file instead of failing deep inside with a traceback.
        raise ValueError(
            f"cannot load the SAE from {where}: a value in its config has the wrong type "
            f"({type(err).__name__}: {err}); fix the file"
        ) from err
    except ValueError as err:
        if path.is_dir() and str(path) not in str(err):  # say which folder's file is wrong
            raise ValueError(f"{where}: {err}") from err
        raise
    for name, (expected, kinds) in _METADATA_KINDS.items():
        value = getattr(sae.cfg.metadata, name)
        wrong = not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))
        if value is not None and wrong:
            raise ValueError(
                f"{where}: metadata {name} is {value!r}, but it must be {expected} (or null); "
                "fix the file"
            )
    context = sae.cfg.metadata.context_size
    if context is not None and context <= 0:
        raise ValueError(f"{where}: metadata context_size is {context}, but it must be positive")
    return sae


def _load_target(target: str, device: str) -> SAE:
    from saekit.errors import looks_like_path, no_such_path_message
    from saekit.io.converters.sparsify import is_sparsify_cfg
    from saekit.io.native import CFG_FILE, read_cfg_json
    from saekit.io.releases import resolve_release_name

    path = Path(target).expanduser()
    if (path / CFG_FILE).is_file() and not is_sparsify_cfg(read_cfg_json(path)):
        return SAE.load(path, device=device)
    if path.is_dir():  # a folder laid out like a published repo (sparsify, Gemma Scope...)
        return SAE.from_pretrained(str(path), device=device).sae
    if path.exists():
        raise NotADirectoryError(
            f"{target} is a file; pass the folder that holds the SAE's {CFG_FILE}"
        )
    parts = target.split("/")
    for i in range(1, len(parts)):
        release = "/".join(parts[:i])
        if resolve_release_name(release) is not None:
            return SAE.from_pretrained(release, "/".join(parts[i:]), device=device).sae
    if resolve_release_name(target) is not None:
        return SAE.from_pretrained(target, device=device).sae
    if looks_like_path(target):
        raise FileNotFoundError(
            f"{no_such_path_message(target, 'folder')}; pass the folder of a saved SAE (with "
            f"{CFG_FILE}), RELEASE/SAE_ID (`saekit pretrained list`) or a Hub repo id"
        )
    if len(parts) >= 2 and _REPO_ID.match("/".join(parts[:2])):
        return SAE.from_pretrained(
            "/".join(parts[:2]), "/".join(parts[2:]) or None, device=device
        ).sae
    raise ValueError(
        f"cannot find the SAE {target!r}: it is not a folder with {CFG_FILE}, not "
        "RELEASE/SAE_ID of a known release (`saekit pretrained list`), and not a Hub repo id"
    )


def resolve_model(saes: Sequence[SAE], model: Any = None, backend: str = "auto") -> ModelBackend:
    """The backend for `model`, or for the model named in the SAEs' metadata; `backend` as
    in `saekit.models.load_model` (which model library runs a model given by name)."""
    from saekit.models import load_model

    device = saes[0].device
    if model is not None:
        if isinstance(model, (str, Path)):
            return load_model(model, backend=backend, device=device)
        return load_model(model, backend=backend)
    names = {sae.cfg.metadata.model_name for sae in saes}
    if None in names:
        raise ValueError(
            "no model given and the SAE's metadata names none (cfg.metadata.model_name is "
            "empty); pass the model it was trained on, e.g. model='gpt2' or --model gpt2"
        )
    if len(names) > 1:
        raise ValueError(
            f"the SAEs belong to different models {sorted(names)}; evaluate them separately "
            "or pass the model explicitly"
        )
    (name,) = names
    try:
        return load_model(name, backend=backend, device=device)
    except Exception as err:  # noqa: BLE001 - any load failure gets the same advice
        raise ValueError(
            f"could not load the model {name!r} named in the SAE's metadata (model_name): "
            f"{err}. Pass the model explicitly (model=... or --model), e.g. a local folder"
        ) from err
