"""The output folder of an export: refused when it holds files (unless `overwrite`), and
assembled beside itself so that an interrupted export leaves no half-written folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saekit.errors import SaekitError


def check_export_folder(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """`out` as a Path, after refusing a file or (without `overwrite`) a folder with files.

    Called before any work, so that a wrong --out costs nothing."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SaekitError(f"{flag} {out} is a file, not a folder; pass a folder to write into")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise SaekitError(
            f"{flag} {out} already holds files; pass --overwrite (overwrite=True) to replace "
            "the folder, or choose another one"
        )
    return folder


@contextmanager
def staged_folder(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; when the block ends without an error it
    becomes `out` (replacing what was there, which `overwrite` allowed). On an error the
    staging folder is removed and `out` is untouched."""
    from saekit.io.native import make_staging_dir

    folder = check_export_folder(out, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(folder.parent, f".{folder.name}.export-")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
