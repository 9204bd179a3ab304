"""Share SAEs on the Hugging Face Hub: the native folder plus a model card, in one commit.

Uploads go through `huggingface_hub.HfApi`; the token is handed to it and never written into
any uploaded file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from saekit.config import SAEConfig
from saekit.io.cfg_layout import config_from_dict
from saekit.io.native import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, read_cfg_json
from saekit.io.releases import check_relative_path

CARD_FILE = "README.md"


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def model_card(
    cfg: SAEConfig, repo_id: str, sae_id: str | None = None, metrics: dict[str, Any] | None = None
) -> str:
    """A model card (README.md) for one SAE: what it is, where it reads, how to load it."""
    meta = cfg.metadata
    rows = [
        ("architecture", cfg.architecture),
        ("d_in", cfg.d_in),
        ("d_sae (width)", cfg.d_sae),
        ("model", meta.model_name),
        ("hook", meta.hook_name),
    ]
    if meta.hook_name_out:
        rows.append(("output hook", meta.hook_name_out))
    if cfg.k is not None:
        rows.append(("k", cfg.k))
    rows += [("dataset", meta.dataset_path), ("context size", meta.context_size)]
    if cfg.normalize_activations != "none":
        rows.append(("input normalisation", cfg.normalize_activations))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value is not None)
    tags = ["saekit", "sparse-autoencoder", "mechanistic-interpretability"]
    front = ["---", "library_name: saekit", "tags:"] + [f"- {tag}" for tag in tags]
    if meta.model_name and "/" in meta.model_name:
        front.append(f"base_model: {meta.model_name}")
    front.append("---")
    sae_arg = f", sae_id={sae_id!r}" if sae_id else ""
    title = f"{repo_id}/{sae_id}" if sae_id else repo_id
    parts = [
        "\n".join(front),
        f"# {title}",
        f"A {cfg.architecture} sparse autoencoder with {cfg.d_sae} latents"
        + (f" on `{meta.hook_name}` of `{meta.model_name}`." if meta.hook_name else "."),
        "| setting | value |\n|---|---|\n" + table,
    ]
    if metrics:
        metric_rows = "\n".join(
            f"| {name} | {_format_metric(value)} |" for name, value in sorted(metrics.items())
        )
        parts.append("## Evaluation\n\n| metric | value |\n|---|---|\n" + metric_rows)
    parts.append(
        "## Load it\n\n```python\nfrom saekit import SAE\n\n"
        f'sae, cfg_dict, sparsity = SAE.from_pretrained("{repo_id}"{sae_arg})\n```\n\n'
        "The files follow the common `cfg.json` + `sae_weights.safetensors` layout, so other "
        "SAE libraries that read it can load them too."
    )
    return "\n\n".join(parts) + "\n"


def push_to_hub(
    sae_folder: str | Path,
    repo_id: str,
    sae_id: str | None = None,
    *,
    metrics: dict[str, Any] | None = None,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a saved native SAE folder (its cfg.json, weights and sparsity, plus a model card)
    to `repo_id`, in folder `sae_id` if given. Other files in the folder are not uploaded.

    Creates the repo if needed. With `sae_id` the card goes into the folder, and also to the
    repo root when the repo has no README yet. Returns the commit's URL.
    """
    from huggingface_hub import HfApi

    if sae_id is not None:
        check_relative_path(sae_id, "sae_id")
        sae_id = sae_id.strip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    source = Path(sae_folder)
    cfg = config_from_dict(read_cfg_json(source), source=str(source / CFG_FILE))
    card = model_card(cfg, repo_id, sae_id, metrics)
    with tempfile.TemporaryDirectory(prefix="saekit-upload-") as tmp:
        root = Path(tmp)
        folder = root / sae_id if sae_id else root / "sae"
        folder.mkdir(parents=True)
        for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
        if metrics:
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if sae_id is None:
            upload_root, path_in_repo = folder, ""
        else:
            upload_root, path_in_repo = root, ""
            if not api.file_exists(repo_id, CARD_FILE, revision=revision):
                (root / CARD_FILE).write_text(card, encoding="utf-8")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=upload_root,
            path_in_repo=path_in_repo,
            revision=revision,
            commit_message=commit_message or f"Upload {cfg.architecture} SAE"
            + (f" {sae_id}" if sae_id else ""),
        )
    return str(info.commit_url) if hasattr(info, "commit_url") else str(info)


def upload_saes_to_huggingface(
    saes_dict: dict[str, Any],
    hf_repo_id: str,
    hf_revision: str = "main",
    show_progress: bool = True,
    add_default_readme: bool = True,
    **upload_options: Any,
) -> list[str]:
    """SAELens's bulk upload: each {sae_id: SAE or saved folder} into its folder of
    `hf_repo_id`, with a model card; returns the commit URLs. `show_progress` and
    `add_default_readme` are accepted for SAELens code (saekit always writes the cards);
    `upload_options` as for `push_to_hub`."""
    if not saes_dict:
        raise ValueError("no SAEs to upload: pass {sae_id: SAE or folder}")
    urls = []
    for sae_id, sae in saes_dict.items():
        # A folder is uploaded as it is; an SAE saves itself first (SAE.push_to_hub).
        if isinstance(sae, (str, os.PathLike)):
            urls.append(push_to_hub(sae, hf_repo_id, sae_id, revision=hf_revision,
                                    **upload_options))
        else:
            urls.append(sae.push_to_hub(hf_repo_id, sae_id, revision=hf_revision,
                                        **upload_options))
    return urls
