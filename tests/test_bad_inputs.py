"""A table of a user's mistakes, each run through the real command line.

For every row: a non-zero exit, exactly one `saekit: error:` line that names the input, no
traceback, and nothing the user had changed, lost or left behind (every file and folder of
the world, and of the row's own folder, hashed before and after). Rows run in-process
through `saekit.cli.main`; a few also run as a subprocess to check the exit status end to
end. The Hub is offline here (as on a cluster without network) except for the upload rows,
which talk to a local server answering 401 or 500.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from cli_world import World, build_world, tree_digest, write_corpus
from safetensors.torch import load_file, save_file

from saekit.cli import main
from saekit.training import checkpoint as ckpt

ERROR_LINE = re.compile(r"^saekit(?: [\w-]+)*: error: ")
Setup = Callable[[Path, World], None]


@dataclass
class Case:
    id: str
    argv: str
    """The command line; {model} {corpus} {sae} {run} {cache} {root} {case} {train} and the
    endpoints {hub401} {hub500} {closed} are filled in."""
    expect: tuple[str, ...]
    """Text the error must hold: the input's name and what is wrong."""
    setup: Setup | None = None
    online: bool = False


# ----- building bad inputs ---------------------------------------------------------------------


def write(name: str, data: bytes | str) -> Setup:
    def setup(case: Path, world: World) -> None:
        path = case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)

    return setup


def copy_of(what: str, change: Callable[[Path], None] | None = None) -> Setup:
    """A copy of the world's `what` (sae, run, cache) as `case/what`, then `change(copy)`."""

    def setup(case: Path, world: World) -> None:
        target = case / what
        shutil.copytree(getattr(world, what), target)
        if change is not None:
            change(target)

    return setup


def json_edit(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit the JSON file `name` of a copy: `edit(data)` changes it in place."""

    def change(folder: Path) -> None:
        file = folder / name
        data = json.loads(file.read_text())
        edit(data)
        file.write_text(json.dumps(data))

    return change


def cfg(**changes: object) -> Setup:
    """The world's SAE with cfg.json fields replaced (a `metadata.` prefix reaches into the
    metadata)."""

    def edit(data: dict) -> None:
        for key, value in changes.items():
            if key.startswith("metadata__"):
                data["metadata"][key.removeprefix("metadata__")] = value
            else:
                data[key] = value

    return copy_of("sae", json_edit("cfg.json", edit))


def raw_file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def truncated(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        file = folder / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return change


def weights(edit: Callable[[dict[str, torch.Tensor]], None], name: str = "sae_weights") -> Setup:
    def change(folder: Path) -> None:
        file = folder / f"{name}.safetensors"
        tensors = dict(load_file(file))
        edit(tensors)
        save_file(tensors, file)

    return copy_of("sae", change)


def every_checkpoint(change: Callable[[Path], None]) -> Setup:
    def edit(run: Path) -> None:
        for path in ckpt.list_checkpoints(run):
            change(path)

    return copy_of("run", edit)


def sparsify_folder(**cfg_changes: object) -> Setup:
    """An EleutherAI sparsify SAE folder (cfg.json + sae.safetensors), cfg.json changed."""

    def setup(case: Path, world: World) -> None:
        folder = case / "layers.0"
        folder.mkdir(parents=True)
        raw = {"k": 4, "num_latents": 64, "expansion_factor": 2, **cfg_changes}
        (folder / "cfg.json").write_text(json.dumps(raw))
        save_file(
            {"encoder.weight": torch.randn(64, 32), "encoder.bias": torch.zeros(64),
             "W_dec": torch.randn(64, 32), "b_dec": torch.zeros(32)},
            folder / "sae.safetensors",
        )

    return setup


def llama_scope_folder(**changes: object) -> Setup:
    """A Llama Scope SAE folder (hyperparams.json + checkpoints/final.safetensors)."""

    def setup(case: Path, world: World) -> None:
        folder = case / "llama"
        (folder / "checkpoints").mkdir(parents=True)
        raw = {"jump_relu_threshold": 0.5, "hook_point_in": "blocks.0.hook_resid_post",
               "hook_point_out": "blocks.0.hook_resid_post", **changes}
        (folder / "hyperparams.json").write_text(json.dumps(raw))
        save_file(
            {"encoder.weight": torch.randn(64, 32), "encoder.bias": torch.zeros(64),
             "decoder.weight": torch.randn(32, 64), "decoder.bias": torch.zeros(32)},
            folder / "checkpoints" / "final.safetensors",
        )

    return setup


def dictionary_learning_folder(raw: dict) -> Setup:
    """A dictionary_learning checkpoint folder (config.json + ae.pt)."""

    def setup(case: Path, world: World) -> None:
        folder = case / "dl"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(raw))
        state = {"encoder.weight": torch.randn(64, 32), "encoder.bias": torch.zeros(64),
                 "decoder.weight": torch.randn(32, 64), "b_dec": torch.zeros(32)}
        torch.save(state, folder / "ae.pt")

    return setup


def dl_config(**trainer: object) -> dict:
    base = {"dict_class": "AutoEncoderTopK", "k": 4, "layer": 0, "lm_name": "tiny"}
    return {"trainer": {**base, **trainer}, "buffer": {"ctx_len": 64}}


def run_edit(name: str, data: str) -> Setup:
    return copy_of("run", raw_file(name, data.encode()))


def cache_meta(edit: Callable[[dict], object]) -> Setup:
    return copy_of("cache", json_edit("metadata.json", edit))


def yaml_edit(section: str, key: str, value: object) -> Setup:
    def change(run: Path) -> None:
        file = run / "run_config.yaml"
        data = yaml.safe_load(file.read_text())
        data[section][key] = value
        file.write_text(yaml.safe_dump(data))

    return copy_of("run", change)


LATIN1 = "A first line\nCaf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")
EVAL = "eval {case}/sae --no-downstream --tokens 64 --out {case}/eval"
FROM_CACHE = (
    "train --activations {case}/cache --model {model} --context-size 64 --tokens 512 "
    "--batch-size 256 "
    "--eval-tokens 0 --expansion-factor 2 --k 8 --no-report --no-progress -q --out {case}/out"
)
RESUME = "train --resume {case}/run --no-progress -q"
NO_CUDA = "cuda:99"  # no machine has a hundred GPUs: refused with or without CUDA


CASES: list[Case] = [
    # ----- command-line flags: training ------------------------------------------------------
    Case("train-model-missing-folder", "{train} --model {root}/nosuch",
         ("no such model folder", "nosuch")),
    Case("train-model-deep-missing-path", "{train} --model nosuch/model/deeper",
         ("no such model folder", "nosuch/model/deeper")),
    Case("train-model-unknown-hub-id-offline", "{train} --model nosuch-model-xyz",
         ("no such model folder or Hub id", "nosuch-model-xyz")),
    Case("train-model-is-a-text-file", "{train} --model {corpus}",
         ("corpus.txt", "not a model folder")),
    Case("train-model-folder-without-config", "{train} --model {case}/empty_model",
         ("empty_model", "not a model folder"), write("empty_model/notes.txt", "nothing")),
    Case("train-dataset-missing-file", "{train} --dataset missing.txt",
         ("no such dataset file", "missing.txt")),
    Case("train-dataset-missing-path-in-folder", "{train} --dataset data/missing",
         ("no such dataset file", "data/missing")),
    Case("train-dataset-missing-absolute", "{train} --dataset {root}/gone/docs.jsonl",
         ("no such dataset file", "docs.jsonl")),
    Case("train-dataset-empty-file", "{train} --dataset {case}/empty.txt",
         ("empty.txt", "holds no text"), write("empty.txt", "")),
    Case("train-dataset-whitespace-file", "{train} --dataset {case}/blank.txt",
         ("blank.txt", "holds no text"), write("blank.txt", "  \n\n \t\n")),
    Case("train-dataset-binary-file", "{train} --dataset {case}/blob.txt",
         ("blob.txt", "binary"), write("blob.txt", bytes(range(256)) * 4)),
    Case("train-dataset-latin1-file", "{train} --dataset {case}/latin1.txt",
         ("latin1.txt", "not UTF-8", "line 2", "Re-encode"), write("latin1.txt", LATIN1)),
    Case("train-dataset-cut-utf8-file", "{train} --dataset {case}/cut.txt",
         ("cut.txt", "not UTF-8"), write("cut.txt", b"Shall I compare thee\n\xe2\x80")),
    Case("train-dataset-latin1-jsonl", "{train} --dataset {case}/docs.jsonl",
         ("docs.jsonl", "not UTF-8"),
         write("docs.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')),
    Case("train-dataset-bad-jsonl", "{train} --dataset {case}/bad.jsonl",
         ("bad.jsonl", "cannot read"), write("bad.jsonl", '{"text": "a"}\n{not json\n')),
    Case("train-dataset-folder-with-latin1-file", "{train} --dataset {case}/texts",
         ("latin1.txt", "not UTF-8"), write("texts/latin1.txt", LATIN1)),
    Case("train-dataset-unknown-suffix", "{train} --dataset {case}/docs.xyz",
         ("docs.xyz", "suffix"), write("docs.xyz", "some text")),
    Case("train-eval-dataset-missing", "{train} --eval-dataset missing.txt",
         ("--eval-dataset", "missing.txt")),
    Case("train-context-size-over-model", "{train} --context-size 512",
         ("--context-size 512", "128 positions")),
    Case("train-device-missing", f"{{train}} --device {NO_CUDA}", (NO_CUDA, "no such device")),
    Case("train-device-nonsense", "{train} --device nonsense",
         ("--device nonsense", "not a device name")),
    Case("train-model-device-missing", f"{{train}} --model-device {NO_CUDA}",
         ("--model-device", "no such device")),
    Case("train-dtype-float16-on-cpu", "{train} --device cpu --dtype float16",
         ("--dtype float16", "CPU")),
    Case("train-dtype-bfloat16-on-cpu", "{train} --device cpu --dtype bfloat16",
         ("--dtype bfloat16", "CPU")),
    Case("train-dtype-unknown", "{train} --dtype float8", ("dtype", "float8")),
    Case("train-tokens-not-a-number", "{train} --tokens abc", ("--tokens", "abc")),
    Case("train-grad-clip-nan", "{train} --grad-clip nan", ("grad_clip", "nan")),
    Case("train-lr-negative", "{train} --lr -1", ("lr",)),
    Case("train-batch-size-zero", "{train} --batch-size 0", ("batch_size",)),
    Case("train-k-over-width", "{train} --k 1000", ("k=1000",)),
    Case("train-architecture-unknown", "{train} --architecture nosuch", ("nosuch",)),
    Case("train-hook-unknown", "{train} --hook blocks.0.hook_nosuch", ("blocks.0.hook_nosuch",)),
    Case("train-out-exists", "{train} --out {case}/mine", ("mine", "already exists"),
         write("mine/notes.txt", "my notes")),
    Case("train-out-is-a-file", "{train} --out {case}/file.txt", ("file.txt", "already exists"),
         write("file.txt", "my notes")),
    Case("train-config-missing", "{train} --config {case}/nosuch.yaml", ("nosuch.yaml",)),
    Case("train-config-not-yaml", "{train} --config {case}/bad.yaml", ("bad.yaml",),
         write("bad.yaml", "training: [unclosed\n  lr: : :")),
    Case("train-config-unknown-key", "{train} --config {case}/typo.yaml", ("lrr",),
         write("typo.yaml", "training:\n  lrr: 0.1\n")),
    Case("train-resume-missing", "train --resume {root}/nosuchrun", ("nosuchrun",)),
    Case("train-activations-missing", "{train} --activations {root}/nosuchcache",
         ("nosuchcache",)),
    # ----- command-line flags: the other commands -----------------------------------------
    Case("eval-target-typo-in-existing-folder", "eval runs/typo",
         ("no such folder", "runs/typo")),
    Case("eval-target-dot-slash", "eval ./typo", ("no such folder", "./typo")),
    Case("eval-target-is-a-file", "eval {corpus}", ("corpus.txt", "is a file")),
    Case("eval-dataset-missing", "eval {sae} --dataset missing.txt --no-downstream",
         ("missing.txt",)),
    Case("eval-context-size-over-model", "eval {sae} --context-size 512",
         ("--context-size 512", "128 positions")),
    Case("eval-device-missing", f"eval {{sae}} --device {NO_CUDA}", (NO_CUDA, "no such device")),
    Case("eval-model-missing", "eval {sae} --model {root}/nosuch", ("nosuch", "no such model")),
    Case("eval-tokens-zero", "eval {sae} --tokens 0 --no-downstream", ("tokens",)),
    Case("eval-tokens-not-a-number", "eval {sae} --tokens many", ("--tokens", "many")),
    Case("eval-unknown-split", "eval {sae} --dataset {corpus} --split nosuch --no-downstream",
         ("nosuch", "split")),
    Case("eval-model-batch-size-zero", "eval {sae} --model-batch-size 0",
         ("--model-batch-size", "at least 1")),
    Case("eval-context-size-zero", "eval {sae} --context-size 0", ("--context-size", "0")),
    Case("eval-out-is-a-file", "eval {sae} --out {corpus} --no-downstream --tokens 64",
         ("--out", "corpus.txt", "is a file")),
    Case("dashboard-top-k-zero", "dashboard {sae} --out {case}/site --top-k 0", ("--top-k",)),
    Case("dashboard-target-typo", "dashboard runs/typo --out {case}/site", ("runs/typo",)),
    Case("dashboard-context-size-over-model",
         "dashboard {sae} --out {case}/site --context-size 512", ("--context-size 512",)),
    Case("upload-missing-folder", "upload runs/typo me/x", ("no such folder", "runs/typo")),
    Case("upload-folder-without-sae", "upload {case}/empty me/x", ("empty", "no saved SAE"),
         write("empty/notes.txt", "nothing")),
    Case("upload-bad-metrics-json", "upload {case}/sae me/x --endpoint {hub500}",
         ("metrics.json", "not valid JSON"), copy_of("sae", raw_file("metrics.json", b"{l0:"))),
    Case("upload-offline", "upload {sae} me/x", ("me/x", "HF_HUB_OFFLINE")),
    Case("upload-unauthorized", "upload {sae} me/x --endpoint {hub401}", ("me/x", "401"),
         online=True),
    Case("upload-server-error", "upload {sae} me/x --endpoint {hub500}", ("me/x", "500"),
         online=True),
    Case("upload-unreachable", "upload {sae} me/x --endpoint {closed}",
         ("me/x", "cannot reach"), online=True),
    Case("pretrained-unknown-release", "pretrained show nosuch-release", ("nosuch-release",)),
    Case("cache-dataset-missing",
         "cache --model {model} --hook " + "blocks.0.hook_resid_pre"
         + " --dataset missing.txt --tokens 100 --out {case}/c", ("missing.txt",)),
    Case("cache-context-size-over-model",
         "cache --model {model} --hook blocks.0.hook_resid_pre --dataset {corpus} --tokens 100 "
         "--out {case}/c --context-size 512", ("--context-size 512",)),
    Case("cache-device-missing",
         f"cache --model {{model}} --hook blocks.0.hook_resid_pre --dataset {{corpus}} "
         f"--tokens 100 --out {{case}}/c --device {NO_CUDA}", (NO_CUDA,)),
    Case("cache-out-is-a-file",
         "cache --model {model} --hook blocks.0.hook_resid_pre --dataset {corpus} --tokens 100 "
         "--out {corpus}", ("--out", "corpus.txt", "is a file")),
    Case("cache-shard-tokens-zero",
         "cache --model {model} --hook blocks.0.hook_resid_pre --dataset {corpus} --tokens 100 "
         "--out {case}/c --shard-tokens 0", ("--shard-tokens",)),
    Case("pretokenize-out-is-a-file",
         "pretokenize --tokenizer {model} --dataset {corpus} --out {corpus}",
         ("--out", "corpus.txt", "is a file")),
    Case("pretokenize-max-sequences-negative",
         "pretokenize --tokenizer {model} --dataset {corpus} --out {case}/t --max-sequences -1",
         ("--max-sequences",)),
    Case("pretokenize-tokenizer-missing",
         "pretokenize --tokenizer {root}/nosuch --dataset {corpus} --out {case}/t",
         ("nosuch", "no such tokenizer folder")),
    Case("pretokenize-dataset-latin1",
         "pretokenize --tokenizer {model} --dataset {case}/latin1.txt --out {case}/t",
         ("latin1.txt", "not UTF-8"), write("latin1.txt", LATIN1)),
    Case("hooks-model-missing", "hooks {root}/nosuch", ("nosuch", "no such model folder")),
    Case("hooks-device-missing", f"hooks {{model}} --device {NO_CUDA}", (NO_CUDA,)),
    # ----- cfg.json ------------------------------------------------------------------------
    Case("cfg-not-json", EVAL, ("cfg.json", "not valid JSON"),
         copy_of("sae", raw_file("cfg.json", b"{\"d_in\": 32,"))),
    Case("cfg-latin1-bytes", EVAL, ("cfg.json",), copy_of("sae", raw_file("cfg.json", LATIN1))),
    Case("cfg-a-list", EVAL, ("cfg.json", "JSON object"),
         copy_of("sae", raw_file("cfg.json", b"[1, 2]"))),
    Case("cfg-missing-d-in", EVAL, ("cfg.json", "d_in"),
         copy_of("sae", json_edit("cfg.json", lambda d: d.pop("d_in")))),
    Case("cfg-d-in-string", EVAL, ("cfg.json", "d_in"), cfg(d_in="32")),
    Case("cfg-d-in-fraction", EVAL, ("cfg.json", "d_in"), cfg(d_in=32.5)),
    Case("cfg-d-sae-null", EVAL, ("cfg.json", "d_sae"), cfg(d_sae=None)),
    Case("cfg-architecture-number", EVAL, ("cfg.json", "architecture"), cfg(architecture=5)),
    Case("cfg-architecture-unknown", EVAL, ("cfg.json", "nosuch"), cfg(architecture="nosuch")),
    Case("cfg-dtype-number", EVAL, ("cfg.json", "dtype"), cfg(dtype=3)),
    Case("cfg-k-string", EVAL, ("cfg.json", "k"), cfg(k="4")),
    Case("cfg-apply-b-dec-string", EVAL, ("cfg.json", "apply_b_dec_to_input"),
         cfg(apply_b_dec_to_input="yes")),
    Case("cfg-normalize-number", EVAL, ("cfg.json", "normalize_activations"),
         cfg(normalize_activations=5)),
    Case("cfg-metadata-string", EVAL, ("cfg.json", "metadata"), cfg(metadata="abc")),
    Case("cfg-metadata-number", EVAL, ("cfg.json", "metadata"), cfg(metadata=5)),
    Case("cfg-context-size-string", EVAL, ("cfg.json", "context_size"),
         cfg(metadata__context_size="64")),
    Case("cfg-model-name-number", EVAL, ("cfg.json", "model_name"), cfg(metadata__model_name=5)),
    Case("cfg-hook-name-list", EVAL, ("cfg.json", "hook_name"),
         cfg(metadata__hook_name=["blocks.0.hook_resid_pre"])),
    Case("cfg-matryoshka-widths-string", EVAL, ("cfg.json", "matryoshka_widths"),
         cfg(matryoshka_widths="abc")),
    # ----- safetensors ----------------------------------------------------------------------
    Case("weights-missing", EVAL, ("sae_weights.safetensors",),
         copy_of("sae", lambda f: (f / "sae_weights.safetensors").unlink())),
    Case("weights-truncated", EVAL, ("sae_weights.safetensors",),
         copy_of("sae", truncated("sae_weights.safetensors"))),
    Case("weights-garbage", EVAL, ("sae_weights.safetensors",),
         copy_of("sae", raw_file("sae_weights.safetensors", os.urandom(300)))),
    Case("weights-tensor-missing", EVAL, ("W_dec",), weights(lambda t: t.pop("W_dec"))),
    Case("weights-wrong-shape", EVAL, ("W_enc",),
         weights(lambda t: t.update(W_enc=torch.zeros(32, 65)))),
    Case("weights-nan", EVAL, ("W_enc",),
         weights(lambda t: t["W_enc"].view(-1).__setitem__(3, float("nan")))),
    Case("sparsity-wrong-shape", EVAL, ("sparsity",),
         copy_of("sae", lambda f: save_file({"sparsity": torch.zeros(7)},
                                            f / "sparsity.safetensors"))),
    # ----- foreign formats' configs ---------------------------------------------------------
    Case("sparsify-k-string", "eval {case}/layers.0 --no-downstream --tokens 64",
         ("cfg.json", "k is 'abc'"), sparsify_folder(k="abc")),
    Case("sparsify-k-null", "eval {case}/layers.0 --no-downstream --tokens 64",
         ("cfg.json", "k"), sparsify_folder(k=None)),
    Case("sparsify-transcode-string", "eval {case}/layers.0 --no-downstream --tokens 64",
         ("cfg.json", "transcode"), sparsify_folder(transcode="yes")),
    Case("llama-scope-threshold-string", "eval {case}/llama --model {model} --no-downstream",
         ("hyperparams.json", "jump_relu_threshold"),
         llama_scope_folder(jump_relu_threshold="high")),
    Case("llama-scope-hook-number", "eval {case}/llama --model {model} --no-downstream",
         ("hyperparams.json", "hook_point_in"), llama_scope_folder(hook_point_in=5)),
    Case("dictionary-learning-trainer-list", "eval {case}/dl --model {model} --no-downstream",
         ("config.json", "trainer"), dictionary_learning_folder({"trainer": ["AutoEncoder"]})),
    Case("dictionary-learning-k-string", "eval {case}/dl --model {model} --no-downstream",
         ("config.json", "k"), dictionary_learning_folder(dl_config(k="4"))),
    Case("dictionary-learning-ctx-len-string", "eval {case}/dl --model {model} --no-downstream",
         ("config.json", "ctx_len"),
         dictionary_learning_folder({**dl_config(), "buffer": {"ctx_len": "64"}})),
    # ----- activation caches ----------------------------------------------------------------
    Case("cache-metadata-not-json", FROM_CACHE, ("metadata.json", "not valid JSON"),
         copy_of("cache", raw_file("metadata.json", b"{\"format\": "))),
    Case("cache-metadata-missing-hooks", FROM_CACHE, ("metadata.json", "hooks"),
         cache_meta(lambda d: d.pop("hooks"))),
    Case("cache-metadata-d-in-string", FROM_CACHE, ("metadata.json", "d_in"),
         cache_meta(lambda d: d.update(d_in={k: str(v) for k, v in d["d_in"].items()}))),
    Case("cache-metadata-tokens-string", FROM_CACHE, ("metadata.json", "n_tokens"),
         cache_meta(lambda d: d.update(n_tokens="many"))),
    Case("cache-metadata-complete-string", FROM_CACHE, ("metadata.json", "complete"),
         cache_meta(lambda d: d.update(complete="yes"))),
    Case("cache-metadata-a-list", FROM_CACHE, ("metadata.json",),
         copy_of("cache", raw_file("metadata.json", b"[]"))),
    Case("cache-progress-not-json", FROM_CACHE, ("progress.json",),
         copy_of("cache", raw_file("progress.json", b"[{\"file\""))),
    Case("cache-shard-truncated", FROM_CACHE, ("shard_00000",),
         copy_of("cache", truncated("shard_00000.safetensors"))),
    # ----- run folders and checkpoints ------------------------------------------------------
    Case("checkpoints-all-truncated", RESUME, ("damaged", "state.pt"),
         every_checkpoint(truncated("state.pt"))),
    Case("checkpoints-all-garbage-no-checksum", RESUME, ("damaged", "state.pt"),
         every_checkpoint(lambda p: ((p / "checksum.json").unlink(),
                                     (p / "state.pt").write_bytes(b"not a checkpoint")))),
    Case("checkpoints-checksum-file-damaged", RESUME, ("damaged", "checksum.json"),
         every_checkpoint(raw_file("checksum.json", b"{oops"))),
    Case("run-state-not-json", RESUME, ("run_state.json", "not valid JSON"),
         run_edit("run_state.json", "{\"norm")),
    Case("run-state-missing", RESUME, ("run_state.json",),
         copy_of("run", lambda r: (r / "run_state.json").unlink())),
    Case("run-config-not-yaml", RESUME, ("run_config.yaml",),
         run_edit("run_config.yaml", "sae: [unclosed\n  : :")),
    Case("run-config-wrong-type", RESUME, ("lr",), yaml_edit("training", "lr", "fast")),
]

#: Rows another part of this work refuses (numeric settings, cfg.json types, non-finite
#: weights); they are expected to pass once that lands, and are marked here until then.
PENDING: dict[str, str] = {}


def _param(case: Case) -> object:
    if case.id in PENDING:
        return pytest.param(
            case, id=case.id, marks=pytest.mark.xfail(strict=False, reason=PENDING[case.id])
        )
    return pytest.param(case, id=case.id)


# ----- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as patch:
        _offline(patch, True)
        built = build_world(root)
    for folder in ("runs", "data", "cases"):
        (root / folder).mkdir()
    return built


def _offline(patch: pytest.MonkeyPatch, offline: bool) -> None:
    """HF_HUB_OFFLINE as huggingface_hub sees it (it reads the variable at import)."""
    from huggingface_hub import constants

    patch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    patch.setattr(constants, "HF_HUB_OFFLINE", offline)


class _Answer(BaseHTTPRequestHandler):
    status = 500

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"error": f"test server says {self.status}"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, str]]:
    """Local servers standing in for a Hub that answers every request with 401 or 500, and
    the address of a port where nothing listens."""
    servers = []
    urls = {}
    for status in (401, 500):
        handler = type(f"Answer{status}", (_Answer,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        urls[f"hub{status}"] = f"http://127.0.0.1:{server.server_address[1]}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        urls["closed"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield urls
    for server in servers:
        server.shutdown()
        server.server_close()


def command(case: Case, world: World, folder: Path, urls: dict[str, str]) -> list[str]:
    fields = {
        "model": world.model, "corpus": world.corpus, "sae": world.sae, "run": world.run,
        "cache": world.cache, "root": world.root, "case": folder,
        "train": shlex.join(world.train_args(folder / "out")), **urls,
    }
    return shlex.split(case.argv.format(**fields))


def world_digest(world: World) -> dict[str, str]:
    """The world's files, except the rows' own folders (each row checks its own)."""
    return {k: v for k, v in tree_digest(world.root).items() if not k.startswith("cases/")}


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refusing a flag
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_error(stderr: str, expect: tuple[str, ...]) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, stderr
    start = stderr.index(lines[0])
    message = stderr[start:]  # a config error lists its problems on the lines below
    for text in expect:
        assert text in message, f"{text!r} not in {message!r}"
    return lines[0]


# ----- the table -----------------------------------------------------------------------------


def test_the_table_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_a_bad_input_gets_one_line_and_changes_nothing(
    case: Case,
    world: World,
    endpoints: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = world.root / "cases" / case.id
    folder.mkdir()
    if case.setup is not None:
        case.setup(folder, world)
    monkeypatch.chdir(world.root)
    _offline(monkeypatch, not case.online)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    before, own_before = world_digest(world), tree_digest(folder)
    code, stderr = run_in_process(command(case, world, folder, endpoints), capsys)
    assert code != 0, stderr
    assert_one_error(stderr, case.expect)
    assert world_digest(world) == before
    assert tree_digest(folder) == own_before


# ----- end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case_id",
    ["eval-target-typo-in-existing-folder", "train-dataset-latin1-file", "cfg-d-in-string",
     "checkpoints-all-truncated"],
)
def test_the_console_script_exits_non_zero_without_a_traceback(
    case_id: str, world: World, endpoints: dict[str, str], tmp_path: Path
) -> None:
    case = next(c for c in CASES if c.id == case_id)
    if case.setup is not None:
        case.setup(tmp_path, world)
    argv = command(case, world, tmp_path, endpoints)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "saekit.cli", *argv], cwd=world.root, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert_one_error(result.stderr, case.expect)


def test_verbose_shows_the_traceback_too(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(world.root)
    code, stderr = run_in_process(["-v", "eval", "runs/typo"], capsys)
    assert code == 2
    assert "Traceback" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("saekit: error: no such folder")


def test_the_good_versions_of_the_foreign_folders_load(world: World, tmp_path: Path) -> None:
    """The foreign-format rows fail for the field they change, not for the rest."""
    from saekit.targets import load_target

    sparsify_folder()(tmp_path, world)
    llama_scope_folder()(tmp_path, world)
    dictionary_learning_folder(dl_config())(tmp_path, world)
    for name in ("layers.0", "llama", "dl"):
        assert load_target(str(tmp_path / name), "cpu").cfg.d_sae == 64


def test_the_world_is_sound(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """The unchanged inputs work, so every row's failure is its bad input's."""
    assert main(["eval", str(world.sae), "--no-downstream", "--tokens", "64",
                 "--out", str(world.root / "cases" / "good-eval")]) == 0
    corpus = write_corpus(world.root / "cases" / "good.txt", lines=50)
    assert corpus.stat().st_size > 0
    assert len(ckpt.list_checkpoints(world.run)) == 2
    capsys.readouterr()
