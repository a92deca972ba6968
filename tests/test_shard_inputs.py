"""data_tools.shard on inputs that used to go wrong silently or with a traceback (issue 12):
ambiguous label columns, pixel modes and sizes, and what the walk or the disk does to the sharder.
Real images throughout (foolbox's ImageNet JPEGs and CIFAR PNGs, Fashion-MNIST when installed)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.shard import main as shard_main
from data_tools.shard_format import MAX_IMAGE_PIXELS
from vitscale.data.decode import decode_image


def run(src: Path, out: Path, *extra: str) -> int:
    return shard_main(["--src", str(src), "--out", str(out), "--no-progress", *extra])


def samples(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for split in m["splits"].values() for s in split["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def errors(out: Path) -> dict[str, str]:
    return {r["source"]: r["reason"] for r in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}


@pytest.fixture()
def photos(foolbox_data: Path, tmp_path: Path) -> list[Path]:
    """12 real ImageNet JPEGs copied beside the manifests the tests write."""
    out = []
    for i, p in enumerate(sorted(foolbox_data.glob("imagenet_*.jpg"))[:12]):
        out.append(tmp_path / f"img{i}.jpg")
        shutil.copy(p, out[-1])
    return out


# ------------------------------------------------------------------------------------------ labels
def test_bom_csv_keeps_integer_labels(photos: list[Path], tmp_path: Path) -> None:
    """Spreadsheets' "CSV UTF-8" starts with a byte-order mark: the header must still be read as
    one (before: 13 classes sorted as text, img10 -> class 2, exit 0)."""
    rows = "".join(f"{p.name},{i}\r\n" for i, p in enumerate(photos))
    (tmp_path / "list.csv").write_bytes(b"\xef\xbb\xbf" + f"path,label\r\n{rows}".encode())
    assert run(tmp_path / "list.csv", tmp_path / "out", "--no-shuffle") == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_classes"] == 12 and m["num_samples"] == 12
    for s in samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        assert int(s["cls"]) == int(meta["source"][3:-4])  # img10.jpg -> class 10


def test_header_spellings_and_bom_jsonl(photos: list[Path], tmp_path: Path) -> None:
    rows = "".join(f"{p.name},{'cat' if i % 2 else 'dog'},n{i}\n" for i, p in enumerate(photos[:4]))
    (tmp_path / "list.csv").write_text(" Path , LABEL ,note\n" + rows)
    assert run(tmp_path / "list.csv", tmp_path / "csv") == 0
    metas = [json.loads(s["json"]) for s in samples(tmp_path / "csv")]
    assert {m["label"] for m in metas} == {"cat", "dog"} and all(m["note"].startswith("n") for m in metas)
    lines = "".join(json.dumps({"path": p.name, "label": i}) + "\n" for i, p in enumerate(photos[:3]))
    (tmp_path / "list.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "names.txt").write_bytes(b"\xef\xbb\xbfzero\none\ntwo\n")
    assert run(tmp_path / "list.jsonl", tmp_path / "jsonl", "--class-names", str(tmp_path / "names.txt")) == 0
    assert json.loads((tmp_path / "jsonl" / "manifest.json").read_text())["class_names"] == ["zero", "one", "two"]


AMBIGUOUS = {
    "unrecognised header, integer labels": ("list.csv", "file,class\n{0},0\n{1},1\n{2},2\n", ":1:", "header"),
    "unrecognised header, name labels": ("list.csv", "file,class\n{0},cat\n{1},dog\n{2},cat\n", ":1:", "header"),
    "one name among integers": ("list.csv", "{0},0\n{1},1\n{2},two\n{3},3\n", ":3:", "all integer"),
    "spreadsheet float": ("list.csv", "{0},0\n{1},1.0\n", ":2:", "not an integer"),
    "case-only difference": ("list.csv", "{0},Cat\n{1},dog\n{2},cat\n", ":3:", "only in case"),
    "semicolons": ("list.csv", "path;label\n{0};0\n", ":1:", "use commas"),
    "negative index": ("list.csv", "{0},0\n{1},-1\n", ":2:", "not a class index"),
    "json boolean": ("list.jsonl", '{{"path": "{0}", "label": 1}}\n{{"path": "{1}", "label": true}}\n', ":2:",
                     "neither"),
    "json float": ("list.jsonl", '{{"path": "{0}", "label": 3.0}}\n', ":1:", "not an integer"),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_ambiguous_label_column_is_one_clear_error(case: str, photos: list[Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    name, template, line, words = AMBIGUOUS[case]
    (tmp_path / name).write_text(template.format(*(p.name for p in photos)))
    assert run(tmp_path / name, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}{line}" in err[0] and words in err[0], err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_non_utf8_manifest_names_its_line(photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "list.csv").write_bytes(f"{photos[0].name},caf\xe9\n".encode() + b"x.jpg,caf\xe9\n")  # latin-1 2nd
    assert run(tmp_path / "list.csv", tmp_path / "out") == 2
    assert "list.csv:2: not UTF-8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ pixels
_RAW16 = {"I;16": "<u2", "I;16L": "<u2", "I;16N": "=u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}
FORMATS = ["PNG", "TIFF", "WEBP", "BMP", "GIF", "JPEG", "PPM", "TGA"]


def _in_mode(photo: Image.Image, mode: str) -> Image.Image:
    """A real photo's pixels (so wrong scaling shows) in `mode`; 16-bit modes span 0..65535."""
    if mode in _RAW16:
        grey = np.asarray(photo.convert("L"), dtype=np.float64)
        values = grey / 255 if mode == "F" else grey * 257  # full range of the mode's 8-bit meaning
        return Image.frombytes(mode, photo.size, values.astype(_RAW16[mode]).tobytes())
    return photo.convert(mode)


def test_every_pillow_mode_is_scaled_correctly_or_rejected(foolbox_data: Path, tmp_path: Path) -> None:
    """Every (mode, format) Pillow writes and reads back: either in errors.jsonl with a reason,
    or stored so that the reader's 8-bit pixels match the source's (16-bit scaled, not clipped)."""
    photo = Image.open(sorted(foolbox_data.glob("imagenet_*.jpg"))[0]).convert("RGB").resize((40, 24))
    src = tmp_path / "src" / "all"
    src.mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}
    for mode in Image.MODES:
        for fmt in FORMATS:
            try:
                img = _in_mode(photo, mode)
                buf = io.BytesIO()
                img.save(buf, fmt)
                back = Image.open(io.BytesIO(buf.getvalue()))
                back.load()
            except Exception:
                continue  # this format cannot hold this mode
            name = f"{mode.replace(';', '_')}.{fmt.lower()}"
            (src / name).write_bytes(buf.getvalue())
            if back.mode.startswith("I;16"):
                ref = np.round(np.asarray(back, dtype=np.float64) / 257).astype(np.uint8)
            elif back.mode in ("I", "F", "LAB", "HSV"):
                ref = None
            else:
                ref = np.asarray(back.convert("L"))
            expected[f"all/{name}"] = ref
    assert len(expected) > 40 and any(k.startswith("all/I_16") for k in expected)
    assert run(tmp_path / "src", tmp_path / "out") == 0
    rejected = errors(tmp_path / "out")
    stored = {json.loads(s["json"])["source"]: s for s in samples(tmp_path / "out")}
    assert set(rejected) | set(stored) == set(expected) and not set(rejected) & set(stored)
    for source, reason in rejected.items():
        assert expected[source] is None and "mode" in reason, (source, reason)
    for source, s in stored.items():
        ext = next(e for e in ("png", "jpg", "webp") if e in s)
        grey = decode_image(s[ext], ext, 1)[..., 0]
        ref = expected[source]
        assert ref is not None, source
        # Lossless: off by rounding at most. JPEG: simplejpeg's and Pillow's decoders differ by a few levels.
        assert np.abs(grey.astype(int) - ref.astype(int)).max() <= (4 if ext == "jpg" else 1), source
    assert {s.split("/")[1] for s in rejected} >= {"I.tiff", "F.tiff"}


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (3, 1), (2, 2)])
def test_tiny_images_train_and_eval(size: tuple[int, int], tmp_path: Path) -> None:
    """A 1x1 image crashed timm's crop sampler (a 0-pixel box, ZeroDivisionError) on every pass."""
    from vitscale.data.config import AugmentConfig
    from vitscale.data.transforms import EvalTransform, TrainTransform

    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 10)).save(buf, fmt)
        train = TrainTransform(16, AugmentConfig(scale=(0.08, 1.0)), (0.5,) * 3, 3)
        for seed in range(300):
            assert train(buf.getvalue(), ext, seed).shape == (3, 16, 16)
        assert EvalTransform(16, 0.875, 1)(buf.getvalue(), ext).shape == (1, 16, 16)


def test_sharder_and_reader_pixel_limits_agree(tmp_path: Path) -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1  # just over the limit (~90 M pixels, 88 KiB as PNG)
    (tmp_path / "src" / "big").mkdir(parents=True)
    Image.new("L", (side, side), 128).save(tmp_path / "src" / "big" / "scan.png")
    assert run(tmp_path / "src", tmp_path / "refused") == 0
    assert "readers' limit" in errors(tmp_path / "refused")["big/scan.png"]
    assert run(tmp_path / "src", tmp_path / "resized", "--resize-short-side", "32") == 0
    [s] = samples(tmp_path / "resized")
    assert decode_image(s["png"], "png", 1).shape == (32, 32, 1)
    from vitscale.data.decode import image_size

    with pytest.raises(ValueError, match="readers' limit"):
        image_size((tmp_path / "src" / "big" / "scan.png").read_bytes(), "png")


# ------------------------------------------------------------------------------ the sharder's walk
def _folder_corpus(root: Path, foolbox_data: Path) -> Path:
    for cls, pattern in (("a", "cifar10_0*.png"), ("b", "imagenet_0[0-2]*.jpg")):
        (root / cls / "sub").mkdir(parents=True)
        for p in sorted(foolbox_data.glob(pattern)):
            shutil.copy(p, root / cls / p.name)
    return root


def test_walk_reports_what_it_cannot_list(foolbox_data: Path, tmp_path: Path) -> None:
    """Before: a non-UTF-8 name, a dangling symlink or a symlink loop aborted with a traceback
    that did not name the file; a FIFO would block forever. Now each is an errors.jsonl line."""
    src = _folder_corpus(tmp_path / "src", foolbox_data)
    shutil.copy(next(foolbox_data.glob("cifar10_1*.png")), os.fsencode(src / "a") + b"/caf\xe9.png")
    (src / "a" / "dangling.png").symlink_to("nowhere.png")
    (src / "a" / "loop1.png").symlink_to("loop2.png")
    (src / "a" / "loop2.png").symlink_to("loop1.png")
    (src / "a" / "sub" / "up").symlink_to("..")
    os.mkfifo(src / "b" / "pipe.jpg")
    (src / "README.txt").write_text("not a class\n")
    good = len(list(foolbox_data.glob("cifar10_0*.png"))) + len(list(foolbox_data.glob("imagenet_0[0-2]*.jpg")))
    assert run(src, tmp_path / "out") == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_samples"] == good and m["num_rejected"] == 6 and m["num_unlisted"] == 1
    reasons = errors(tmp_path / "out")
    assert "not valid UTF-8" in reasons["a/caf\\xe9.png"]
    assert "dangling symlink" in reasons["a/dangling.png"]
    assert "symlink loop" in reasons["a/loop1.png"] and "symlink loop" in reasons["a/loop2.png"]
    assert "symlink loop" in reasons["a/sub/up/"]
    assert "FIFO" in reasons["b/pipe.jpg"] and "not in a class folder" in reasons["README.txt"]


def test_unreadable_subfolder_is_an_error_line(foolbox_data: Path, tmp_path: Path) -> None:
    """Before: skipped without a word. Root reads any folder, so as root the sharder runs with
    the capabilities that bypass file permissions dropped (setpriv), as a normal user would."""
    src = _folder_corpus(tmp_path / "src", foolbox_data)
    shutil.copy(next(foolbox_data.glob("cifar10_1*.png")), src / "a" / "sub" / "hidden.png")
    (src / "a" / "sub").chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder unreadable to the sharder")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "data_tools.shard", "--src", str(src), "--out",
                                 str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=120)
    finally:
        (src / "a" / "sub").chmod(0o755)
    assert result.returncode == 0, result.stderr
    reasons = errors(tmp_path / "out")
    assert list(reasons) == ["a/sub/"] and "unreadable folder" in reasons["a/sub/"]


def test_only_own_temporaries_are_deleted(foolbox_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _folder_corpus(tmp_path / "src", foolbox_data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp-1").write_text("a user's file")
    (out / "data-000000.tar.tmp-99").write_text("maybe an old sharder's, maybe not")
    (out / ".shard-state" / "tmp").mkdir(parents=True)
    (out / ".shard-state" / "tmp" / "data-000000.tar.tmp-99").write_bytes(b"left by a killed run")
    assert run(src, out) == 0
    assert (out / "notes.tmp-1").exists() and (out / "data-000000.tar.tmp-99").exists()
    assert not list((out / ".shard-state" / "tmp").iterdir())
    assert "data-000000.tar.tmp-99" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_is_one_line_and_frees_its_temporaries(workers: str, foolbox_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "x"
    src.mkdir(parents=True)
    for p in foolbox_data.glob("imagenet_*.jpg"):  # ~1.5 MB: does not fit in 1 MiB
        shutil.copy(p, src / p.name)
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        result = subprocess.run([sys.executable, "-m", "data_tools.shard", "--src", str(src.parent), "--out",
                                 str(disk / "out"), "--no-progress", "--samples-per-shard", "3", "--workers", workers],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "rerun the same command" in err[0], err
        assert not list((disk / "out" / ".shard-state" / "tmp").iterdir())
        tars = sorted((disk / "out").glob("*.tar"))  # each with its sidecar: a rerun reuses them
        assert tars and f"{len(tars)} of 7 shards complete" in err[0]
        assert len(list((disk / "out" / ".shard-state").glob("*.tar.json"))) == len(tars)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_manifest_rows_that_are_not_files_are_rejected(photos: list[Path], tmp_path: Path) -> None:
    """A FIFO listed in a manifest used to block the sharder forever on open()."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "list.csv").write_text(f"{photos[0].name},0\npipe.jpg,1\nfolder.jpg,1\nmissing.jpg,0\n")
    assert run(tmp_path / "list.csv", tmp_path / "out") == 0
    reasons = errors(tmp_path / "out")
    assert reasons["pipe.jpg"] == "not a regular file" and reasons["folder.jpg"] == "not a regular file"
    assert "No such file" in reasons["missing.jpg"] and len(samples(tmp_path / "out")) == 1
