"""data_tools.verify: a clean output passes; each kind of damage is reported and exits non-zero."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.shard import main as shard_main
from data_tools.verify import main as verify_main
from data_tools.verify import verify


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> Path:
    out = tmp_path_factory.mktemp("shards")
    src = tmp_path_factory.mktemp("src")
    for p in foolbox_data.iterdir():
        (src / p.name.split("_")[0]).mkdir(exist_ok=True)
        shutil.copy(p, src / p.name.split("_")[0] / p.name)
    assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--samples-per-shard", "25"]) == 0
    return out


@pytest.fixture
def damaged(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    return out


def test_clean_output_passes_with_decode(clean: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify_main([str(clean), "--decode"]) == 0
    assert "OK, 4 shards" in capsys.readouterr().out


def test_flipped_byte_is_a_sha256_mismatch(damaged: Path) -> None:
    shard = damaged / "data-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "data_tools.verify", str(damaged)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "data-000001.tar: sha256" in result.stderr and "1 problem(s)" in result.stderr


def test_truncated_and_missing_shards(damaged: Path) -> None:
    shard = damaged / "data-000002.tar"
    shard.write_bytes(shard.read_bytes()[:30_000])
    (damaged / "data-000003.tar").unlink()
    (damaged / "stray-000000.tar").write_bytes(b"")
    _, problems = verify(damaged)
    text = "\n".join(problems)
    assert "data-000002.tar: 30000 bytes" in text and "data-000002.tar: unreadable tar" in text
    assert "data-000003.tar: missing" in text
    assert "stray-000000.tar: tar file not listed" in text


def test_decode_finds_an_undecodable_image_with_matching_checksums(damaged: Path) -> None:
    """A shard whose bytes match its manifest entry but holds a non-image: only --decode sees it."""
    name = "data-000000.tar"
    samples = list(wds.WebDataset(str(damaged / name), shardshuffle=False))
    victim = next(s for s in samples if "jpg" in s)
    victim["jpg"] = b"\xff\xd8 this is not a JPEG \xff\xd9"
    with wds.TarWriter(str(damaged / name), encoder=False, mtime=0) as tw:
        for s in samples:
            tw.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("_")})
    manifest = json.loads((damaged / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    entry["bytes"] = (damaged / name).stat().st_size
    entry["sha256"] = hashlib.sha256((damaged / name).read_bytes()).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert verify(damaged)[1] == []
    problems = verify(damaged, decode=True)[1]
    assert len(problems) == 1 and f"{victim['__key__']}.jpg: does not decode" in problems[0]


def test_not_a_shard_folder(tmp_path: Path) -> None:
    checked, problems = verify(tmp_path)
    assert checked == 0 and "not a data_tools.shard manifest" in problems[0]
