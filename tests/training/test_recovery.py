"""Losing nothing: checksummed checkpoints and the fall back to the newest intact one, a disk
that fills mid-write (a real small file system where the kernel allows one, a real file size
limit everywhere), temporary files left by a kill cleared on the next start, files that
honour the umask, and `saekit ... | head` ending quietly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_world import build_world, tree_digest, write_corpus
from training_helpers import make_sae, small_config

from saekit import SAE
from saekit.cli import main
from saekit.io.native import CFG_FILE, WEIGHTS_FILE
from saekit.training import SAEJob, Trainer
from saekit.training import checkpoint as ckpt
from saekit.training.synthetic import SparseFeatureStream

STEPS = 24
TESTS = str(Path(__file__).resolve().parent.parent)
HERE = str(Path(__file__).resolve().parent)


def job() -> SAEJob:
    return SAEJob(make_sae("topk", seed=2), small_config(STEPS))


def stream() -> SparseFeatureStream:
    return SparseFeatureStream(16, 32, 256, offset=1.0, seed=5)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())


# ----- checksums and the fall back -----------------------------------------------------------


def test_every_checkpoint_carries_its_size_and_sha256(tmp_path: Path) -> None:
    path = ckpt.write_checkpoint(tmp_path, 7, {"tokens": 7, "w": torch.arange(10.0)}, keep=2)
    record = json.loads((path / ckpt.CHECKSUM_FILE).read_text())
    data = (path / ckpt.STATE_FILE).read_bytes()
    import hashlib

    assert record == {
        "file": ckpt.STATE_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()
    }
    assert torch.equal(ckpt.read_checkpoint(path)["w"], torch.arange(10.0))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path: Path, damage: str) -> None:
    path = ckpt.write_checkpoint(tmp_path, 7, {"tokens": 7, "w": torch.zeros(100)}, keep=2)
    file = path / ckpt.STATE_FILE
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        file.write_bytes(data[:100])
        match = "is 100 bytes, but"
    else:
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
        file.write_bytes(data)
        match = "does not match the checksum"
    with pytest.raises(ckpt.CorruptCheckpoint, match=match):
        ckpt.read_checkpoint(path)


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path: Path) -> None:
    path = ckpt.write_checkpoint(tmp_path, 7, {"tokens": 7}, keep=2)
    (path / ckpt.CHECKSUM_FILE).unlink()
    assert ckpt.read_checkpoint(path)["tokens"] == 7


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = Trainer(job(), stream()).fit().saes["sae"]
    run = tmp_path / "run"
    every = 8 * 256
    Trainer(job(), stream(), run, checkpoint_every=every, keep_checkpoints=3).fit()
    older, newest = ckpt.list_checkpoints(run)[-2:]
    state = newest / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:-500])  # a copy cut short

    resumed = Trainer(job(), stream(), run, checkpoint_every=every, keep_checkpoints=3)
    with caplog.at_level("WARNING", logger="saekit"):
        result = resumed.fit(resume=True)
    assert f"checkpoint {newest.name} is damaged" in caplog.text
    assert f"resuming from the older checkpoint {older.name}" in caplog.text
    # Continued from the older one, to the same weights as a run never interrupted.
    assert same_weights(result.saes["sae"], reference)
    # The damaged one is kept for inspection, out of the way of pruning and later resumes.
    names = sorted(p.name for p in ckpt.checkpoint_dir(run).iterdir())
    assert f"{ckpt.DAMAGED_PREFIX}{newest.name}" in names
    assert [p.name for p in ckpt.list_checkpoints(run)][-1] == newest.name  # written again
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(run))["tokens"] == STEPS * 256


def test_every_checkpoint_damaged_is_one_error_and_moves_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(job(), stream(), run, checkpoint_every=8 * 256).fit()
    for path in ckpt.list_checkpoints(run):
        (path / ckpt.STATE_FILE).write_bytes(b"garbage")
    before = tree_digest(run)
    with pytest.raises(ckpt.CorruptCheckpoint, match="every checkpoint of .* is damaged"):
        Trainer(job(), stream(), run, checkpoint_every=8 * 256).fit(resume=True)
    assert tree_digest(run) == before


# ----- the command line: a damaged checkpoint, leftovers of a kill --------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - cli_world.World
    return build_world(tmp_path_factory.mktemp("recovery"))


def test_saekit_train_resumes_past_a_damaged_checkpoint(
    world, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    newest = ckpt.latest_checkpoint(run)
    (newest / ckpt.STATE_FILE).write_bytes(b"\0" * 64)
    with caplog.at_level("WARNING", logger="saekit"):
        assert main(["train", "--resume", str(run), "--tokens", "1536", "--no-progress"]) == 0
    assert f"checkpoint {newest.name} is damaged" in caplog.text
    assert "resuming from the older checkpoint tokens_000000000000512" in caplog.text
    assert SAE.load(run).cfg.d_sae == 64
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(run))["tokens"] == 1536


def test_the_leftovers_of_a_kill_mid_save_are_cleared_on_the_next_start(
    world, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    # What a kill during the final save and during a checkpoint leaves behind (the names
    # the writers use): temporary files beside cfg.json and a half-made checkpoint folder.
    leftovers = [run / ".cfg.json.1a2b3c4d", run / ".sae_weights.safetensors.9f8e7d6c"]
    for file in leftovers:
        file.write_bytes(b"half a file")
    staging = ckpt.checkpoint_dir(run) / ".tmp-0a1b2c3d"
    staging.mkdir()
    (staging / ckpt.STATE_FILE).write_bytes(b"half a checkpoint")
    mine = run / ".notes.txt"  # a user's own hidden file is not ours to remove
    mine.write_text("keep me")
    assert main(["train", "--resume", str(run), "--no-progress", "-q"]) == 0
    assert not any(f.exists() for f in leftovers) and not staging.exists()
    assert mine.read_text() == "keep me"


def test_a_save_clears_the_leftovers_of_an_earlier_killed_save(tmp_path: Path) -> None:
    folder = make_sae("standard").save(tmp_path / "sae")
    (folder / ".sae_weights.safetensors.abcdefgh").write_bytes(b"half")
    beside = tmp_path / ".new.0123abcd"  # a killed save of a new folder `new`
    beside.mkdir()
    (beside / WEIGHTS_FILE).write_bytes(b"half")
    make_sae("standard").save(folder)
    make_sae("standard").save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "sae"]
    assert sorted(p.name for p in folder.iterdir()) == [CFG_FILE, WEIGHTS_FILE]


def test_a_start_that_fails_before_its_first_checkpoint_leaves_no_folder(
    world, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # Text for the start (the norm estimate) but far too little for the run.
    corpus = write_corpus(tmp_path / "short.txt", lines=100)
    argv = world.train_args(out)
    argv[argv.index("--dataset") + 1] = str(corpus)
    argv[argv.index("--tokens") + 1] = "200000"
    argv += ["--checkpoint-every", "100000", "--eval-tokens", "64"]
    assert main(argv) == 2
    assert "ran out" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_keeps_the_old_run_when_the_new_start_fails(
    world, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    before = tree_digest(run)
    argv = world.train_args(run) + ["--overwrite", "--context-size", "512"]
    assert main(argv) == 2
    assert "--context-size 512" in capsys.readouterr().err
    assert tree_digest(run) == before


# ----- a full disk ---------------------------------------------------------------------------

DISK_FULL = """
import json, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
sys.path.insert(0, {here!r})
from cli_world import World
from saekit.cli import main
from saekit.training import checkpoint as ckpt

small, model, corpus = Path({small!r}), Path({model!r}), Path({corpus!r})
world = World(small, model, corpus, small, small, small)
run = small / "run"
# Fill the file system but for room for one checkpoint (about 160 kB with the data
# position's window pool), not a second.
filler = small / "filler"
filler.write_bytes(bytes(max(shutil.disk_usage(small).free - 250_000, 0)))
first = main(world.train_args(run))
listing = sorted(p.name for p in ckpt.checkpoint_dir(run).iterdir())
filler.unlink()  # the user frees some space and goes on
second = main(["train", "--resume", str(run), "--no-progress", "-q"])
print(json.dumps({{"first": first, "listing": listing, "second": second,
                   "files": sorted(p.name for p in run.iterdir())}}))
"""


def _userns_tmpfs_works() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp && true"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _userns_tmpfs_works(), reason="no unprivileged user namespaces to mount a small tmpfs"
)
def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_finishes(
    world, tmp_path: Path
) -> None:
    """A real 1 MB file system (tmpfs, mounted in a user namespace: no root needed)."""
    small = tmp_path / "small"
    small.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL.format(
        tests=TESTS, here=HERE, small=str(small), model=str(world.model),
        corpus=str(world.corpus),
    ))
    mount = f"mount -t tmpfs -o size=1m none {small} && exec {sys.executable} {script}"
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["first"] == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("saekit: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "no space left on device while writing the checkpoint" in errors[0]
    assert "kB needed" in errors[0] and "tokens_000000000000512 is intact" in errors[0]
    # The first checkpoint whole, no partial files; then the resumed run finished.
    assert outcome["listing"] == ["tokens_000000000000512"]
    assert outcome["second"] == 0
    assert {CFG_FILE, WEIGHTS_FILE} <= set(outcome["files"])


FILE_LIMIT = """
import json, resource, sys
from pathlib import Path
import torch
sys.path.insert(0, {here!r})
from training_helpers import make_sae
from saekit.errors import DiskFullError
from saekit.training import checkpoint as ckpt

folder = Path({folder!r})
sae = make_sae("standard", d_in=64, d_sae=1024)
old = sae.save(folder / "sae")
first = ckpt.write_checkpoint(folder / "run", 1, {{"w": torch.zeros(10)}}, keep=2)
# A file size limit (ulimit -f) below what either write needs: the kernel answers EFBIG.
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
messages = []
for write in (lambda: make_sae("standard", d_in=64, d_sae=1024, seed=1).save(old),
              lambda: make_sae("standard", d_in=64, d_sae=1024, seed=1).save(folder / "new"),
              lambda: ckpt.write_checkpoint(folder / "run", 2, {{"w": torch.zeros(10**5)}}, 2)):
    try:
        write()
    except DiskFullError as err:
        messages.append(str(err))
print(json.dumps(messages))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_does_not_fit_removes_its_partial_files(tmp_path: Path) -> None:
    """The same paths as a full disk, through a real file size limit (EFBIG), which needs
    no privileges anywhere."""
    script = tmp_path / "limit.py"
    script.write_text(FILE_LIMIT.format(here=HERE, folder=str(tmp_path / "w")))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(messages) == 3
    assert all("file size limit exceeded while writing" in m for m in messages)
    assert "the SAE already there is untouched" in messages[0]
    assert "nothing was written" in messages[1]
    assert "the previous checkpoint tokens_000000000000001 is intact" in messages[2]
    work = tmp_path / "w"
    assert sorted(p.name for p in work.iterdir()) == ["run", "sae"]  # no half-made `new`
    assert sorted(p.name for p in (work / "sae").iterdir()) == [CFG_FILE, WEIGHTS_FILE]
    SAE.load(work / "sae")  # the old SAE, whole
    assert [p.name for p in ckpt.checkpoint_dir(work / "run").iterdir()] == [
        "tokens_000000000000001"
    ]


# ----- permissions and pipes -----------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_honour_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        sae = make_sae("standard")
        folder = sae.save(tmp_path / "new", sparsity=torch.zeros(64))
        sae.save(folder)  # replaced in place
        checkpoint = ckpt.write_checkpoint(tmp_path / "run", 1, {"tokens": 1}, keep=2)
    finally:
        os.umask(previous)
    for path in [folder, checkpoint]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    for path in [*folder.iterdir(), *checkpoint.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_closed_pipe_ends_the_output_quietly() -> None:
    """`saekit pretrained list | head -1`: no BrokenPipeError, the status of SIGPIPE. The
    reading end is closed before the command writes, so the pipe is closed every time."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "saekit.cli", "pretrained", "list"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""
