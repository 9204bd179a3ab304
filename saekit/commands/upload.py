"""`saekit upload RUN_DIR REPO_ID`: share a trained SAE on the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from saekit.errors import SaekitError, no_such_path_message
from saekit.io.native import CFG_FILE

#: Files in which a run may record evaluation metrics ({name: number}); the first found wins.
METRIC_FILES = ("metrics.json", "eval_metrics.json", "eval.json")


def find_sae_folder(run_dir: Path) -> Path:
    """The SAE folder of a run: RUN_DIR itself, or its one (or `final`) sub-folder with cfg.json."""
    if not run_dir.exists():
        raise FileNotFoundError(
            f"{no_such_path_message(run_dir, 'folder')}; pass a training run folder or a saved "
            "SAE folder"
        )
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file; pass a run folder or a saved SAE folder")
    if (run_dir / CFG_FILE).is_file():
        return run_dir
    candidates = sorted(p.parent for p in run_dir.glob(f"*/{CFG_FILE}"))
    for preferred in ("final", "sae"):
        if run_dir / preferred in candidates:
            return run_dir / preferred
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"{run_dir} holds no saved SAE ({CFG_FILE} in it or in a sub-folder); pass the "
            "folder the trainer saved the SAE to"
        )
    names = ", ".join(p.name for p in candidates)
    raise ValueError(f"{run_dir} holds several SAEs ({names}); pass the one to upload")


def read_metrics(*folders: Path) -> dict[str, Any] | None:
    """Numeric metrics from the first metrics file found (nested dicts are flattened)."""
    for folder in folders:
        for name in METRIC_FILES:
            file = folder / name
            if file.is_file():
                try:
                    raw = json.loads(file.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise ValueError(
                        f"{file} is not valid JSON ({err}); fix or remove it (it only adds "
                        "the metrics to the model card)"
                    ) from None
                return _flatten(raw) if isinstance(raw, dict) else None
    return None


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = value
    return out


def hub_problem(err: BaseException, where: str, endpoint: str | None) -> SaekitError | None:
    """One line for what went wrong talking to the Hub (offline, refused, failing, out of
    reach); None for any other error, which keeps its traceback."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    hub = f"the Hub at {endpoint}" if endpoint else "the Hugging Face Hub"
    if isinstance(err, OfflineModeIsEnabled):
        return SaekitError(
            f"cannot upload to {where}: HF_HUB_OFFLINE is set, so the Hub is not contacted; "
            "upload from a machine with network access, with HF_HUB_OFFLINE unset"
        )
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        code = getattr(response, "status_code", None)
        said = " ".join(str(err).split("\n")[0].split())[:200]
        if code in (401, 403):
            return SaekitError(
                f"{hub} refused the upload to {where} ({said}): not logged in, or the token "
                "cannot write there; log in with `hf auth login` or set HF_TOKEN to a token "
                "with write access"
            )
        if isinstance(code, int) and code >= 500:
            return SaekitError(
                f"{hub} failed while uploading to {where} ({said}); the server is at fault, "
                "not the SAE: try again later"
            )
        return SaekitError(f"{hub} refused the upload to {where}: {said}")
    network = isinstance(err, ConnectionError) or any(
        cls.__name__ in ("TransportError", "RequestError", "ConnectionError")
        and cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
        for cls in type(err).__mro__
    )
    if network:
        return SaekitError(
            f"cannot reach {hub} to upload to {where} ({err}); check the network connection, "
            "and HF_ENDPOINT or --endpoint if you use a mirror"
        )
    return None


def run_upload(args: argparse.Namespace) -> int:
    from saekit.io.hub import push_to_hub
    from saekit.progress import status
    from saekit.targets import load_target

    run_dir = Path(args.run_dir)
    folder = find_sae_folder(run_dir)
    # Refuses a folder that does not load, or whose weights or sparsity are not finite.
    load_target(str(folder), "cpu")
    metrics = read_metrics(folder, run_dir)
    where = f"{args.repo_id}/{args.sae_id}" if args.sae_id else args.repo_id
    # The Hub client draws the bytes of large files below this line.
    try:
        with status(f"uploading {folder} to {where}"):
            url = push_to_hub(
                folder,
                args.repo_id,
                args.sae_id,
                metrics=metrics,
                private=args.private,
                revision=args.revision,
                commit_message=args.message,
                endpoint=args.endpoint,
            )
    except Exception as err:
        problem = hub_problem(err, where, args.endpoint)
        if problem is None:
            raise
        raise problem from err
    print(f"uploaded {folder} to {where}: {url}")
    print(
        f'load it with SAE.from_pretrained("{args.repo_id}"'
        + (f', "{args.sae_id}")' if args.sae_id else ")")
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upload",
        help="upload a trained SAE to the Hugging Face Hub",
        description=(
            "Upload a saved SAE (cfg.json + sae_weights.safetensors) with a model card. "
            "Authenticate with `hf auth login` or the HF_TOKEN environment variable."
        ),
    )
    parser.add_argument("run_dir", help="training run folder, or the saved SAE folder itself")
    parser.add_argument("repo_id", help="Hub repo to upload to, owner/name (created if missing)")
    parser.add_argument("--sae-id", help="folder inside the repo (default: the repo root)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--message", help="commit message")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("HF_ENDPOINT"),
        help="Hub endpoint URL, for mirrors or a private Hub (default: $HF_ENDPOINT or the Hub)",
    )
    parser.set_defaults(func=run_upload)
