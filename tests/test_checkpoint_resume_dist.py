"""resume=auto and full disks with 2 real ranks (torchrun, gloo, ZeRO-2) through vitscale/train.py.

The issue's case: `latest` lost and the newest checkpoint corrupt on rank 1's optimizer partition.
Before, the run restarted from step 0 without a word and overwrote the step checkpoints; now it
resumes from the newest intact checkpoint with one warning naming the file, and the corrupt one is
moved aside, not overwritten. A disk that fills during a save stops both ranks (no hang) with
`no space left on <dir>` and leaves no checkpoint that resume=auto would take.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_train_dist import launch, losses, shards  # noqa: F401 - `shards` is a fixture

pytestmark = pytest.mark.slow
RUN = ["deepspeed=zero2", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=0", "trainer.export_at_end=false",
       "data.val_shards=null"]


def _text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_auto_resume_without_latest_skips_the_corrupt_newest(shards: list[str], tmp_path: Path) -> None:
    from vitscale.engine.checkpoint import REPLACED_DIR, tags

    out = tmp_path / "run"
    first = launch("torchrun", out, [*shards, *RUN, "trainer.max_steps=6"])
    assert first.returncode == 0, _text(first)[-4000:]
    root = out / "checkpoints"
    assert tags(root) == ["step_00000002", "step_00000004", "step_00000006"]
    body = json.loads((root / "step_00000006" / "manifest.json").read_text())
    assert {"rank_0.pt", "rank_1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"} <= set(body["files"])

    (root / "latest").unlink()
    bad = root / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    data[-64] ^= 0xFF
    bad.write_bytes(bytes(data))
    logged_before = len((out / "metrics.jsonl").read_text().splitlines())

    second = launch("torchrun", out, [*shards, *RUN, "trainer.max_steps=8"])
    text = _text(second)
    assert second.returncode == 0, text[-4000:]
    skipped = [line for line in text.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and str(bad) in skipped[0], skipped  # one line, from rank 0 only
    assert f"resumed from {root / 'step_00000004'} at step 4" in text
    resumed = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()[logged_before:]]
    assert resumed and min(resumed) == 5 and max(resumed) == 8  # not from step 0
    assert tags(root) == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    [moved] = (root / REPLACED_DIR).iterdir()  # the corrupt step 6, kept rather than overwritten
    assert (moved / bad.name).read_bytes() == bytes(data)
    assert (root / "latest").read_text() == "step_00000008"
    assert sorted(losses(out)) == list(range(1, 9))


def test_full_disk_stops_both_ranks_with_one_line(shards: list[str], tmp_path: Path) -> None:
    out = tmp_path / "full"
    out.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(out)], capture_output=True,
                           text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a small tmpfs ({mount.stderr.strip() or 'mount failed'}; needs root)")
    try:
        proc = launch("torchrun", out, [*shards, *RUN, "trainer.max_steps=2"], timeout=300)
        text = _text(proc)
        assert proc.returncode != 0
        assert f"no space left on {out / 'checkpoints'}" in text, text[-4000:]
        assert "iostream error" not in text and "unexpected pos" not in text
        from vitscale.engine.checkpoint import resolve

        assert resolve("auto", out) is None  # nothing half-written to resume from
    finally:
        subprocess.run(["umount", str(out)], check=False)
