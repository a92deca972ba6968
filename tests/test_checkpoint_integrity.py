"""Checkpoint integrity and safety on real DeepSpeed files (ZeRO-2, a process group of one, in process).

- every save writes manifest.json (sha256 of every file) after the files, then `latest`;
- resume=auto without `latest` takes the newest intact checkpoint, skipping a corrupt or unfinished one
  with one warning that names the file; a named bad checkpoint is one error line naming the file;
- a save never overwrites a tag directory it did not write (moved to checkpoints/replaced/);
- a full disk (a real tmpfs) is `no space left on <dir>` and leaves nothing resume=auto would take;
- no loader unpickles code: a payload at every load path is refused with one line, its marker unwritten.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_engine import engine_in_process, plant_payload, save, step  # tests/ is on sys.path
from vitscale.engine import checkpoint as ckpt
from vitscale.engine.checkpoint import manifest

LOGGER = "vitscale.engine.checkpoint"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with engine_in_process(tmp_path_factory.mktemp("engine")) as t:
        yield t


@pytest.fixture
def out(trainer: Any, tmp_path: Path) -> Path:
    """A fresh output_dir for this test, with checkpoints at steps 2, 4, 6 (`latest` -> 6)."""
    trainer.output_dir = tmp_path / "run"
    for s in (2, 4, 6):
        step(trainer)
        save(trainer, s)
    return trainer.output_dir


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def _refresh_manifest(tag_dir: Path) -> None:
    """What an attacker who can write files can also do: make the checksums match the new content."""
    body = json.loads((tag_dir / manifest.MANIFEST).read_text())
    files = manifest.digest_own_files(tag_dir, 0, 1)
    manifest.write(tag_dir, tag=body["tag"], step=body["step"], world_size=1, files=files)


# ------------------------------------------------------------------------------------ manifest
def test_manifest_lists_every_file_with_its_checksum(out: Path) -> None:
    tag_dir = out / "checkpoints" / "step_00000006"
    body = json.loads((tag_dir / manifest.MANIFEST).read_text())
    on_disk = sorted(p.name for p in tag_dir.iterdir() if p.name != manifest.MANIFEST)
    assert sorted(body["files"]) == on_disk
    assert {"rank_0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(on_disk)
    assert body["world_size"] == 1 and body["hash"] == "sha256" and body["step"] == 6
    assert body["files"]["rank_0.pt"]["sha256"] == manifest.file_digest(tag_dir / "rank_0.pt")
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert ckpt.verify(ckpt.CheckpointRef(out / "checkpoints", "step_00000006")) is None


# ------------------------------------------------------------------------------ resume=auto
def test_auto_without_latest_resumes_from_the_newest_checkpoint(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    (out / "checkpoints" / "latest").unlink()
    assert ckpt.resolve("auto", out) == ckpt.CheckpointRef(out / "checkpoints", "step_00000006")
    assert not _warnings(caplog)


def test_auto_skips_a_corrupt_newest_checkpoint_with_one_warning(trainer: Any, out: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    root = out / "checkpoints"
    (root / "latest").unlink()
    bad = root / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _flip_byte(bad)
    with caplog.at_level(logging.WARNING, LOGGER):
        ref = ckpt.resolve("auto", out)
    assert ref == ckpt.CheckpointRef(root, "step_00000004")
    [line] = _warnings(caplog)
    assert str(bad) in line and "sha256" in line and "\n" not in line
    client, rank_state = ckpt.load(trainer.engine, ref, rank=0)
    assert client["step"] == 4 and rank_state["data"] == {"n": 4}


def test_auto_skips_an_unfinished_save(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A save killed before its manifest: resume=auto must not pick it even when `latest` names it."""
    root = out / "checkpoints"
    (root / "step_00000006" / manifest.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, LOGGER):
        assert ckpt.resolve("auto", out) == ckpt.CheckpointRef(root, "step_00000004")
    [line] = _warnings(caplog)
    assert "incomplete" in line and str(root / "step_00000006" / manifest.MANIFEST) in line


def test_named_bad_checkpoint_is_one_error_line_naming_the_file(out: Path) -> None:
    root = out / "checkpoints"
    bad = root / "step_00000006" / "rank_0.pt"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    for named in (root, root / "step_00000006"):  # a root whose `latest` names it, and the tag itself
        with pytest.raises(ckpt.CorruptCheckpointError) as err:
            ckpt.resolve(str(named), out)
        assert str(bad) in str(err.value) and "manifest.json says" in str(err.value) and "\n" not in str(err.value)


def test_all_corrupt_is_an_error_and_never_a_silent_fresh_start(out: Path) -> None:
    for tag in ckpt.tags(out / "checkpoints"):
        _flip_byte(out / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint .* resume=null"):
        ckpt.resolve("auto", out)


def test_checkpoints_from_before_manifests_still_resume(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = out / "checkpoints"
    for tag in ckpt.tags(root):
        (root / tag / manifest.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, LOGGER):
        assert ckpt.resolve("auto", out) == ckpt.CheckpointRef(root, "step_00000006")
    [line] = _warnings(caplog)
    assert "no checksum manifest" in line


# ------------------------------------------------------------------------------- overwriting
def test_a_save_never_overwrites_a_checkpoint_it_did_not_write(trainer: Any, out: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root = out / "checkpoints"
    foreign = root / "step_00000008"
    shutil.copytree(root / "step_00000006", foreign)  # e.g. left by another run in this output_dir
    digest = manifest.file_digest(foreign / "rank_0.pt")
    with caplog.at_level(logging.WARNING, LOGGER):
        save(trainer, 8)
    [line] = _warnings(caplog)
    [moved] = (root / ckpt.REPLACED_DIR).iterdir()
    assert str(foreign) in line and str(moved) in line
    assert manifest.file_digest(moved / "rank_0.pt") == digest
    assert ckpt.verify(ckpt.CheckpointRef(root, "step_00000008")) is None
    caplog.clear()
    save(trainer, 8)  # this job's own checkpoint: replaced on purpose, without a word
    assert not _warnings(caplog) and len(list((root / ckpt.REPLACED_DIR).iterdir())) == 1


# ------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Any]:
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{size}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill ({proc.stderr.strip() or 'mount failed'}; needs root)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_full_disk_mid_save_is_one_line_and_leaves_nothing_to_resume(trainer: Any, small_tmpfs: Any) -> None:
    trainer.output_dir = small_tmpfs("200k")  # one checkpoint here is ~270 KiB
    with pytest.raises(ckpt.NoSpaceError) as err:
        save(trainer, 2)
    text = str(err.value)
    assert text.startswith(f"no space left on {trainer.output_dir}") and "\n" not in text
    assert ckpt.tags(trainer.output_dir / "checkpoints") == []  # the partial directory was removed
    assert ckpt.resolve("auto", trainer.output_dir) is None


def test_full_disk_is_detected_before_writing_when_the_last_checkpoint_does_not_fit(
        trainer: Any, small_tmpfs: Any) -> None:
    trainer.output_dir = small_tmpfs("400k")
    save(trainer, 2)
    with pytest.raises(ckpt.NoSpaceError, match="no space left on .*nothing was written"):
        save(trainer, 4)
    assert ckpt.tags(trainer.output_dir / "checkpoints") == ["step_00000002"]
    assert ckpt.resolve("auto", trainer.output_dir).tag == "step_00000002"


# -------------------------------------------------------------------------------- security
def _assert_refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    text = str(err.value)
    assert not marker.exists(), "the payload ran"
    assert f"refusing to load {path}" in text and ("builtins.exec" in text or "global exec" in text)
    assert "\n" not in text


@pytest.mark.parametrize("victim", ["rank_0.pt", "mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_never_runs_a_payload(trainer: Any, out: Path, tmp_path: Path, victim: str) -> None:
    tag_dir = out / "checkpoints" / "step_00000006"
    marker = tmp_path / "pwned"
    plant_payload(tag_dir / victim, marker)
    _refresh_manifest(tag_dir)  # the checksums match: only the unpickler stands in the way
    ref = ckpt.resolve("auto", out)
    assert ref.tag == "step_00000006"
    with pytest.raises(ckpt.UnsafeCheckpointError) as err:
        ckpt.load(trainer.engine, ref, rank=0)
    _assert_refused(err, tag_dir / victim, marker)


def test_export_paths_never_run_a_payload(trainer: Any, out: Path, tmp_path: Path) -> None:
    from launch.best_model import _module_weights

    tag_dir = out / "checkpoints" / "step_00000006"
    ref = ckpt.CheckpointRef(out / "checkpoints", "step_00000006")
    marker = tmp_path / "pwned"
    for victim, load in (("zero_pp_rank_0_mp_rank_00_optim_states.pt",  # DeepSpeed's zero_to_fp32
                          lambda: ckpt.consolidated_state_dict(ref, zero_stage=2, module=trainer.engine.module)),
                         ("mp_rank_00_model_states.pt", lambda: _module_weights(tag_dir))):  # launch/best_model
        plant_payload(tag_dir / victim, marker)
        with pytest.raises(ckpt.UnsafeCheckpointError) as err:
            load()
        _assert_refused(err, tag_dir / victim, marker)


def test_a_raw_pickle_is_refused_and_a_real_checkpoint_loads(out: Path, tmp_path: Path) -> None:
    import pickle

    from ckpt_engine import Payload

    marker, raw = tmp_path / "pwned", tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=f"refusing to load {raw}"):
        ckpt.safe_load(raw)
    assert not marker.exists()
    optim = ckpt.safe_load(out / "checkpoints" / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "optimizer_state_dict" in optim  # LossScaler, ZeroStageEnum, fragment_address: allow-listed
