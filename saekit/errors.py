"""Errors a user can act on, and the one line the command line prints for each.

An error a user can act on says what was wrong (naming the file, folder, flag or device),
what was expected and what to do. Such errors are `SaekitError`s, or `ValueError`s and
`OSError`s raised with such a message; `saekit` prints them as one `saekit: error: ...` line
and exits non-zero, with the traceback only under `-v`. Any other exception is a bug in
saekit and keeps its traceback.

This module imports nothing heavy: the command line imports it before any command runs.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

#: errno values that mean "the file system cannot take these bytes", and how to say so.
NO_SPACE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
}
_OS_ERROR = re.compile(r"os error (\d+)")


class SaekitError(Exception):
    """A mistake in the input (a path, a flag, a file's contents) or in the machine's state
    (a full disk, a missing device) that the user can fix; the message says how."""


class DiskFullError(SaekitError, OSError):
    """A write that did not fit on the file system. Whatever was being written was removed
    again; what was there before (the previous checkpoint, the old SAE) is untouched."""

    def __init__(self, message: str, path: Path, needed: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.needed = needed


def os_errno(err: BaseException) -> int | None:
    """The errno behind `err`: an OSError's own, the one a Rust library (safetensors)
    quotes in its message as `os error N`, or else that of the error it was raised while
    handling (torch's zip writer reports a failed write as a RuntimeError of its own)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        match = _OS_ERROR.search(str(current))
        if match:
            return int(match.group(1))
        current = current.__cause__ or current.__context__
    return None


def human_bytes(n: float) -> str:
    """`12.3 MB` (powers of 1000, as df -H and file managers count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the file system holding `path` (or its nearest existing
    parent); None if that cannot be read."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def disk_full_error(
    err: BaseException, what: str, path: Path, needed: int | None, after: str = ""
) -> DiskFullError | None:
    """A `DiskFullError` for `err` when it is a file system out of room (ENOSPC, EDQUOT,
    EFBIG), else None. `what` names the write ("checkpoint", "SAE"), `path` its target,
    `needed` its approximate size; `after` ends the message (what is intact, how to go on)."""
    code = os_errno(err)
    if code not in NO_SPACE_ERRNOS:
        return None
    # Free space says nothing about a per-file size limit (EFBIG).
    free = free_bytes(path) if code != errno.EFBIG else None
    size = f"about {human_bytes(needed)} needed" if needed is not None else ""
    room = f"{human_bytes(free)} free" if free is not None else ""
    detail = ", ".join(part for part in (size, room) if part)
    message = (
        f"{NO_SPACE_ERRNOS[code]} while writing the {what} {path}"
        + (f" ({detail})" if detail else "")
        + (f"; {after}" if after else "")
    )
    return DiskFullError(message, Path(path), needed)


def one_line(err: BaseException) -> str:
    """The message the command line prints for `err`: its text, with a config error of a
    single problem on one line (several problems stay a list, one per line)."""
    problems = getattr(err, "problems", None)
    if isinstance(problems, list) and len(problems) == 1:
        head = str(err).split("(", 1)[0].strip()
        return f"{head}: {problems[0]}"
    text = str(err).strip()
    if isinstance(err, OSError) and not isinstance(err, SaekitError) and err.errno is not None:
        reason = NO_SPACE_ERRNOS.get(err.errno) or err.strerror or text
        where = f": {err.filename}" if err.filename else ""
        text = f"{reason}{where}" if err.strerror and text.startswith("[Errno") else text
    return text or type(err).__name__


def looks_like_path(name: str | os.PathLike[str], suffixes: tuple[str, ...] = ()) -> bool:
    """Whether `name`, which is not an existing file or folder, was meant as one rather than
    as a Hugging Face Hub id (`owner/name`, or a bare name):

    - it starts with `/`, `./`, `../` or `~`, or holds a backslash;
    - it ends with one of `suffixes` (a dataset file such as `data.txt`);
    - it has more than one `/` (Hub ids have at most one);
    - its part before the `/` is a folder here (`runs/typo` when `runs/` exists).
    """
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text:
        return True
    if text in (".", ".."):
        return True
    if suffixes and Path(text).suffix.lower() in suffixes:
        return True
    if text.count("/") > 1:
        return True
    if "/" in text:
        return Path(text.split("/", 1)[0]).expanduser().is_dir()
    return False


def no_such_path_message(name: str | os.PathLike[str], what: str) -> str:
    """`no such folder: runs/typo (runs exists, but holds no typo)`, naming the deepest
    part of the path that does exist, so a typo is easy to spot."""
    path = Path(name).expanduser()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    hint = ""
    if parent.is_dir() and str(parent) not in ("", "."):
        rest = path.relative_to(parent) if path.is_relative_to(parent) else path
        hint = f" ({parent} exists, but holds no {rest})"
    return f"no such {what}: {name}{hint}"


def model_load_error(name: str, err: BaseException, what: str = "model") -> SaekitError:
    """One line for a model (or tokenizer) name that transformers could not load, in place
    of its `Repo id must be in the form ...` or `We couldn't connect to ...`."""
    reason = " ".join(str(err).split()) or type(err).__name__
    if Path(name).expanduser().exists():
        return SaekitError(
            f"{name} is not a {what} folder transformers can read ({reason[:300]}); pass a "
            "folder written by save_pretrained"
        )
    fix = f"pass an existing {what} folder, a Hub id such as gpt2 or EleutherAI/pythia-70m"
    fix += ", or bundled" if what == "model" else ""
    if looks_like_path(name):
        return SaekitError(f"{no_such_path_message(name, f'{what} folder')}; {fix}")
    lowered = reason.lower()
    if "offline" in lowered or "connect" in lowered or _hub_offline():
        return SaekitError(
            f"no such {what} folder or Hub id: {name!r} is not a local folder, and it is not in "
            "the Hub cache while the Hub cannot be reached (HF_HUB_OFFLINE is set or there is "
            f"no network); {fix}, or connect once so that the Hub cache holds it"
        )
    if "valid model identifier" in lowered or "repo id" in lowered or "not found" in lowered:
        return SaekitError(f"no such {what} folder or Hub id: {name!r}; {fix}")
    return SaekitError(f"cannot load the {what} {name!r}: {reason[:300]}")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)
