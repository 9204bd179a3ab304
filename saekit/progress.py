"""Progress bars and a quiet terminal: what every long step of saekit shows, and what it hides.

One process-wide switch decides whether progress is drawn at all: `set_progress(False)` (what
`saekit --no-progress` and `saekit -q` do) turns off every bar and status line, saekit's and
the Hugging Face libraries' alike. Below that switch, a library function called with
`progress=False` turns off its own bar; `progress=None` (the default) follows the switch.
Bars go to stderr, so stdout carries only results.

`silence_library_noise()` hides what the libraries saekit drives print that a user cannot act
on (see its docstring); real errors and actionable warnings still come through.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_enabled = True
#: Seconds between redraws when stderr is not a terminal (a log file): a line every tick
#: would bury the log, and nobody watches it redraw.
LOG_INTERVAL_S = 10.0
#: Seconds between redraws of a status line's elapsed time on a terminal.
STATUS_TICK_S = 0.5


def set_progress(enabled: bool) -> bool:
    """Turn every progress bar and status line on or off; returns the previous setting.

    Off also turns off the bars of huggingface_hub (downloads, uploads), transformers and
    datasets; on restores those that saekit turned off.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    if not _enabled:
        _library_bars_off()
    else:
        _library_bars_restore()
    return previous


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether a step whose caller passed `progress` (None: no preference) shows progress."""
    return _enabled and progress is not False


@contextmanager
def progress_off(off: bool = True) -> Iterator[None]:
    """No progress is shown inside the block (when `off`); the switch is restored after it."""
    if not off:
        yield
        return
    previous = set_progress(False)
    try:
        yield
    finally:
        set_progress(previous)


def _interactive(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str,
    total: float | None = None,
    progress: bool | None = None,
    unit_scale: bool = True,
    **kwargs: Any,
) -> Any:
    """A tqdm progress bar on stderr showing count, `unit` and rate (`12.3ktok/s`).

    Use it as tqdm: wrap an iterable, or call `.update(n)` and `.close()` (or use `with`).
    `progress=False`, or the process-wide switch being off, gives a bar that draws nothing.
    With `total=None` the bar shows the count and the rate without a percentage. Other
    keyword arguments go to tqdm.
    """
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    kwargs.setdefault("mininterval", 0.1 if _interactive(stream) else LOG_INTERVAL_S)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        unit_scale=unit_scale,
        file=stream,
        disable=not progress_enabled(progress),
        **kwargs,
    )


@contextmanager
def status(message: str, *, progress: bool | None = None) -> Iterator[None]:
    """One line, `message ... 3 s`, counting the seconds while the block runs, then
    `message: 3.2 s`. For steps with nothing to count (loading a model, uploading a folder).

    Drawn by tqdm, so bars that appear meanwhile (a download's bytes) take the lines below
    it instead of overwriting it. On failure the line ends with `failed after 3.2 s`.
    """
    if not progress_enabled(progress):
        yield
        return
    line = bar(desc=f"{message} ...", unit="s", bar_format="{desc}", leave=True)
    start = time.perf_counter()
    stop = threading.Event()
    ticker = None
    if _interactive(line.fp):

        def tick() -> None:
            while not stop.wait(STATUS_TICK_S):
                line.set_description_str(f"{message} ... {time.perf_counter() - start:.0f} s")

        ticker = threading.Thread(target=tick, name="saekit-status", daemon=True)
        ticker.start()
    outcome = "failed after "
    try:
        yield
        outcome = ""
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        line.set_description_str(
            f"{message}: {outcome}{time.perf_counter() - start:.1f} s", refresh=False
        )
        line.close()


def announces_load(load: F) -> F:
    """Decorate a model loader whose first argument is a name or an object: loading by name
    shows a `loading model NAME` status line with the seconds elapsed (downloads show their
    own byte counts below it); objects and backends pass through silently. Either way the
    libraries' loading noise is hidden (`silence_library_noise`)."""

    @functools.wraps(load)
    def wrapper(name_or_object: Any, *args: Any, **kwargs: Any) -> Any:
        by_name = isinstance(name_or_object, (str, os.PathLike))
        silence_library_noise(loading=by_name)
        if not by_name:
            return load(name_or_object, *args, **kwargs)
        with status(f"loading model {os.fspath(name_or_object)}"):
            return load(name_or_object, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ----- library noise -------------------------------------------------------------------------

#: The one attention-mask warning saekit's forward passes set off. (The ones of
#: `model.generate` are left alone: saekit never calls it, so they concern the user's code.)
_ATTENTION_MASK_WARNING = "We strongly recommend passing in an `attention_mask`"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(UNEXPECTED|MISSING|MISMATCH|CONVERSION)\b")


def _load_report(message: str) -> str | None:
    """A transformers load report, shortened to what matters to saekit: None (drop it) when it
    lists only checkpoint weights the model does not use; one sentence when weights of the
    model were not loaded; the report unchanged when it holds conversion errors."""
    text = _ANSI.sub("", message)
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = _REPORT_ROW.match(line.strip())
        if match:
            rows.setdefault(match.group(2), []).append(match.group(1))
    if "CONVERSION" in rows or not rows:
        return message
    lost = rows.get("MISSING", []) + rows.get("MISMATCH", [])
    if not lost:
        return None
    head = text.split("\n", 1)[0]
    model, _, source = head.partition(" LOAD REPORT from: ")
    shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
    return (
        f"{len(lost)} weight(s) of {model.strip()} are not in the checkpoint {source.strip()} "
        f"(or have another shape there) and were randomly initialised: {shown}. Activations "
        "that depend on them are not the trained model's; check that this is the model you "
        "meant"
    )


class _LibraryNoise(logging.Filter):
    """Drops transformers' attention-mask warning and unused-weight load reports, and
    shortens reports of weights left randomly initialised."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        if message.startswith(_ATTENTION_MASK_WARNING):
            return False
        if " LOAD REPORT" in message[:200]:
            shorter = _load_report(message)
            if shorter is None:
                return False
            if shorter != message:
                record.msg, record.args = shorter, ()
        return True


def _hide_loading_weights(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: its "Loading weights" bar repeats, per model object, what the
    `loading model` status already says (and counts tensors, not bytes)."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


_filters_installed = False
_hook_installed = False


def silence_library_noise(*, loading: bool = False) -> None:
    """Hide library output a saekit user cannot act on; idempotent and cheap.

    - transformers' "attention_mask ... may be padded" warnings: saekit feeds packed windows,
      in which the pad id (the BOS/EOS id of GPT-2-style tokenizers) marks document
      boundaries, not padding; unpacked windows are padded at the end only, where causal
      attention keeps padding from reaching earlier tokens, and every metric leaves it out.
    - load reports that list only checkpoint weights the model does not use; a report of
      weights left randomly initialised becomes one warning naming them, and conversion
      errors are reported as transformers writes them.
    - with `loading=True` (about to load a model by name, which imports transformers anyway):
      transformers' "Loading weights" bars; saekit shows one `loading model` line instead.
    """
    global _filters_installed, _hook_installed
    if not _filters_installed:
        _filters_installed = True
        # Loggers exist before their library is imported, so this imports nothing.
        logging.getLogger("transformers.modeling_utils").addFilter(_LibraryNoise())
    if loading and not _hook_installed:
        _hook_installed = True
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        set_hook = getattr(hf_logging, "set_tqdm_hook", None)
        if set_hook is None:  # transformers < 5 draws no such bar
            return
        previous = set_hook(None)
        if previous is None:
            set_hook(_hide_loading_weights)
        else:  # keep a hook someone else installed, minus the one bar

            def chained(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if kwargs.get("desc") == "Loading weights":
                    return _hide_loading_weights(factory, args, kwargs)
                return previous(factory, args, kwargs)

            set_hook(chained)


def quiet_dataset_bars() -> None:
    """Turn off datasets' progress bars ("Generating train split", "Map", "Saving the
    dataset"), which flash by for local files; downloads keep huggingface_hub's byte counts.
    Without importing datasets (half a second on every command): if it is not imported yet,
    its environment variable does it, unless the user set that variable."""
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault(_DATASETS_ENV, "1")


_DATASETS_ENV = "HF_DATASETS_DISABLE_PROGRESS_BARS"
#: How to turn back on the library bars that `set_progress(False)` turned off.
_restore: list[Callable[[], None]] = []


def _library_bars_off() -> None:
    if _restore:
        return
    from huggingface_hub import utils as hub

    if not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        _restore.append(hub.enable_progress_bars)
    # transformers copies huggingface_hub's setting when it is imported; if it is imported
    # already, tell it too.
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        _restore.append(hf_logging.enable_progress_bar)
    # datasets, if not imported yet: the command line turns its bars off for good
    # (`quiet_dataset_bars`).
    datasets = sys.modules.get("datasets")
    if datasets is not None and not datasets.are_progress_bars_disabled():
        datasets.disable_progress_bars()
        _restore.append(datasets.enable_progress_bars)


def _library_bars_restore() -> None:
    while _restore:
        _restore.pop()()


class _CurrentStderr(logging.StreamHandler):
    """Writes each record to `sys.stderr` as it is at that moment, not to the stream of the
    moment the handler was made, so a replaced stderr (a redirect, a test's capture) never
    leaves it writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


#: Libraries that give their loggers a stderr handler of their own on first use.
_LIBRARY_LOGGERS = ("datasets", "transformers", "huggingface_hub")


def _log_to_current_stderr() -> None:
    """The root logger, and the libraries' own loggers, write to the current stderr."""
    if not logging.getLogger().handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if type(old) is logging.StreamHandler:
                new = _CurrentStderr()
                new.setFormatter(old.formatter)
                new.setLevel(old.level)
                logger.removeHandler(old)
                logger.addHandler(new)


@contextmanager
def terminal(
    *, progress: bool = True, quiet: bool = False, verbose: bool = False
) -> Iterator[None]:
    """The command line's output settings for the block; the progress switch and saekit's
    log level are restored afterwards.

    Logs: saekit's at INFO (DEBUG with `verbose`, WARNING with `quiet`), other libraries' at
    WARNING, as bare messages on stderr. Progress: on unless `progress` is False or `quiet`.
    Library noise is silenced (`silence_library_noise`, `quiet_dataset_bars`).
    """
    _log_to_current_stderr()
    saekit_log = logging.getLogger("saekit")
    level = saekit_log.level
    saekit_log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    silence_library_noise()
    quiet_dataset_bars()
    previous = set_progress(progress and not quiet)
    try:
        yield
    finally:
        set_progress(previous)
        saekit_log.setLevel(level)
