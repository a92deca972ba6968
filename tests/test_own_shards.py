"""Bring-your-own WebDataset shards: img2dataset's layout (`jpg`, `txt` caption, `json` metadata
with the class in a field), written by webdataset's own TarWriter, without data_tools' manifest.json.

`data.image_key` / `data.label_key` pick the members; a sample without them is one clear line naming
the shard, the sample, the member expected and the members found, counted as a bad shard.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from safetensors.torch import save_file

from vitscale.data import BadShardsError, build_eval_loader, build_train_loader, check_train_shards
from vitscale.data.config import parse_data_config
from vitscale.data.samples import SampleError, SampleFields

NUM_CLASSES = 3
PER_SHARD = 10
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def img2dataset_shard(path: Path, shard_id: int, photos: list[Path], *, label=lambda i: i % NUM_CLASSES,
                      extra: dict | None = None) -> dict[str, Any]:
    """One tar as img2dataset writes it: key = 5-digit shard id + 4-digit index, members jpg, txt, json
    (url, key, status, sizes, caption, and the extra column `label` via --save_additional_columns)."""
    labels = {}
    with wds.TarWriter(str(path)) as tw:
        for i, photo in enumerate(photos):
            key = f"{shard_id:05d}{i:04d}"
            meta = {"url": f"https://example.org/{photo.name}", "key": key, "status": "success",
                    "error_message": None, "width": 512, "height": 512, "original_width": 512,
                    "original_height": 512, "caption": f"a photo, {photo.stem}", "label": label(i), **(extra or {})}
            tw.write({"__key__": key, "jpg": photo.read_bytes(), "txt": meta["caption"],
                      "json": json.dumps(meta).encode()})
            labels[key] = meta["label"]
    return labels


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> dict:
    photos = sorted(foolbox_data.glob("imagenet_*.jpg"))
    assert len(photos) >= 2 * PER_SHARD
    out = tmp_path_factory.mktemp("img2dataset")
    labels: dict[str, int] = {}
    for s in range(2):
        labels |= img2dataset_shard(out / f"{s:05d}.tar", s, photos[s * PER_SHARD:(s + 1) * PER_SHARD])
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD, "successes": PER_SHARD}))
    # a third shard whose json has no `label` field in one sample (a later, partial export)
    bad = out / "bad" / "00002.tar"
    bad.parent.mkdir()
    img2dataset_shard(bad, 2, photos[:4], label=lambda i: i % NUM_CLASSES if i != 2 else None)
    return {"dir": out, "urls": str(out / "{00000..00001}.tar"), "bad": str(bad), "labels": labels,
            "shards": [str(out / f"{s:05d}.tar") for s in range(2)], "photos": photos}


def cfg(own: dict, **over: Any) -> dict:
    return {"train_shards": own["urls"], "val_shards": own["urls"], "num_classes": NUM_CLASSES, "num_workers": 0,
            "shuffle_buffer": 4, "mean": [0.5], "std": [0.5], "augment": {"scale": [0.5, 1.0]}, "max_bad_shards": 0,
            "label_key": "json:label", **over}


def train(config: dict, batch_size: int = 4):
    return build_train_loader(config, batch_size=batch_size, rank=0, world_size=1, seed=3, img_size=32, in_chans=3)


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------ training
def test_trains_on_img2dataset_shards_with_the_label_in_json(own: dict) -> None:
    assert check_train_shards(cfg(own)).problems == []  # no manifest.json: nothing to compare, nothing wrong
    batches = take(train(cfg(own)), 3)
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.long
        assert batch["label"].tolist() == [own["labels"][k] for k in batch["key"]]
    assert len({k for b in batches for k in b["key"]}) > 4  # draws with replacement: both shards, some twice


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_with_label_errors_counted_as_bad_shards(own: dict, num_workers: int) -> None:
    """A shard whose sample lacks its label is a bad shard (tolerated here); the stream stays exactly
    resumable across it."""
    config = cfg(own, train_shards=own["shards"] + [own["bad"]], max_bad_shards=1000, num_workers=num_workers)
    straight_loader = train(config)
    straight = take(straight_loader, 8)
    first = train(config)
    head = take(first, 3)
    resumed = train(config)
    resumed.load_state_dict(first.state_dict())
    rest = take(resumed, 5)
    assert [b["key"] for b in straight] == [b["key"] for b in head + rest]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(straight, head + rest))
    assert straight_loader.bad_shards > 0  # 1 draw in 3 hits the bad shard over 8 batches


# ---------------------------------------------------------------------------------- evaluation
def test_eval_loader_honours_the_keys(own: dict) -> None:
    seen: dict[str, int] = {}
    for loader in (build_eval_loader(own["urls"], batch_size=3, rank=0, world_size=1, img_size=32, in_chans=3,
                                     num_workers=0, label_key="json.label"),
                   build_eval_loader(own["urls"], batch_size=3, rank=0, world_size=1, img_size=32, in_chans=3,
                                     num_workers=0, cfg_data=cfg(own))):
        seen = {k: int(y) for b in loader for k, y in zip(b["key"], b["label"])}
        assert seen == own["labels"] and loader.count == 2 * PER_SHARD and loader.expected is None


def _tiny_export(root: Path, data: str | None = None) -> Path:
    from vitscale.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=32, patch_size=8, in_chans=3, num_classes=NUM_CLASSES, embed_dim=32,
                         depth=1, num_heads=2)
    root.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    (root / "model_config.json").write_text(json.dumps(model.config))
    if data:
        (root / "train_config.yaml").write_text(data)
    return root


def test_evaluate_cli_label_key(own: dict, tmp_path: Path) -> None:
    from vitscale.evaluate import main

    export = _tiny_export(tmp_path / "export")
    with pytest.raises(BadShardsError, match=r"no 'cls' member .*set data\.label_key=json:label"):
        main(["--weights", str(export), "--val-shards", own["urls"], "--topk"])
    result = main(["--weights", str(export), "--val-shards", own["urls"], "--topk", "--label-key", "json:label",
                   "--image-key", "jpg"])
    assert result["eval/count"] == 2 * PER_SHARD
    # an export trained on these shards carries data.label_key in its train_config.yaml: no flag needed
    trained = _tiny_export(tmp_path / "trained", "data:\n  mean: [0.5]\n  std: [0.5]\n  label_key: json:label\n")
    assert main(["--weights", str(trained), "--val-shards", own["urls"], "--topk"]) == result


# ---------------------------------------------------------------------------------- error lines
def test_default_label_key_names_shard_sample_and_members(own: dict) -> None:
    """Before: `KeyError: 'cls'` from inside a DataLoader worker."""
    with pytest.raises(BadShardsError) as info:
        take(train(cfg(own, label_key="cls")), 1)
    line = str(info.value)
    # TarWriter writes a sample's members in sorted order; the line lists them as the tar holds them
    assert re.search(r"0000[01]\.tar: sample 0000[01]\d{4} has no 'cls' member \(members: jpg, json, txt; "
                     r"json fields: url, key, status, .*\); set data\.label_key=json:label", line), line
    assert "\n" not in line and "KeyError" not in line
    ev = build_eval_loader(own["urls"], batch_size=4, rank=0, world_size=1, img_size=32, in_chans=3, num_workers=0,
                           cfg_data=cfg(own, label_key="cls", max_bad_shards=1))
    with pytest.raises(BadShardsError, match=r"2 eval shards failed .*00001\.tar: sample 000010000 has no 'cls'"):
        list(ev)
    assert ev.bad_shards == own["shards"]


def test_tolerated_bad_shard_is_counted_in_evaluation(own: dict) -> None:
    ev = build_eval_loader(own["shards"] + [own["bad"]], batch_size=4, rank=0, world_size=1, img_size=32,
                           in_chans=3, num_workers=0, cfg_data=cfg(own, max_bad_shards=1))
    keys = [k for b in ev for k in b["key"]]
    assert ev.bad_shards == [own["bad"]]
    assert len(keys) == 2 * PER_SHARD + 2  # the bad shard's two samples before the broken one were used


def sample(**members: Any) -> dict:
    return {"__key__": "000000007", "__url__": "s/00000.tar",
            **{k: v if isinstance(v, bytes) else (json.dumps(v) if k.endswith("json") else str(v)).encode()
               for k, v in members.items()}}


@pytest.mark.parametrize("label_key,members,match", [
    ("txt", {"jpg": b"\xff\xd8\xff", "txt": "a photo of a tench"},
     r"s/00000\.tar: sample 000000007 label 'a photo of a tench' in txt is not an integer class index "
     r"\(data\.label_key=txt\)"),
    ("json:label", {"jpg": b"\xff\xd8\xff", "json": {"label": "tench"}},
     r"label 'tench' in json:label is not an integer class index"),
    ("json:label", {"jpg": b"\xff\xd8\xff", "json": {"label": None}}, r"label None in json:label is not an integer"),
    ("json:labels", {"jpg": b"\xff\xd8\xff", "json": {"url": "u", "label": 1}},
     r"sample 000000007 'json' member has no field 'labels' \(json holds: url, label\); "
     r"set data\.label_key=json:label"),
    ("json:meta.label", {"jpg": b"\xff\xd8\xff", "json": {"meta": {"cls": 1}}},
     r"'json' member has no field 'meta\.label' \(meta holds: cls\)"),
    ("json:label", {"jpg": b"\xff\xd8\xff", "json": b"{not json"}, r"'json' member is not valid JSON"),
    ("json:label", {"jpg": b"\xff\xd8\xff", "txt": "x"},
     r"has no 'json' member \(members: jpg, txt\); set data\.label_key to the member or json field"),
    ("cls", {"jpg": b"\xff\xd8\xff", "cls": "7"}, r"label 7 in cls is outside \[0, data\.num_classes=3\)"),
    ("cls", {"jpg": b"\xff\xd8\xff", "cls": "-1"}, r"label -1 in cls is outside"),
])
def test_label_error_lines(label_key: str, members: dict, match: str) -> None:
    with pytest.raises(SampleError, match=match) as info:
        SampleFields("auto", label_key, NUM_CLASSES).label(sample(**members))
    assert "\n" not in str(info.value)


def test_missing_image_member_line() -> None:
    fields = SampleFields("png", "json:label", NUM_CLASSES)
    with pytest.raises(SampleError, match=r"s/00000\.tar: sample 000000007 has no image member 'png' "
                                          r"\(members: jpg, txt, json; data\.image_key=png\); set data\.image_key"):
        fields.image(sample(jpg=b"\xff\xd8\xff", txt="c", json={"label": 1}))
    with pytest.raises(SampleError, match=r"has no image member 'jpg/jpeg/png/webp' \(members: txt"):
        SampleFields().image(sample(txt="c"))


def test_label_key_spellings() -> None:
    s = sample(jpg=b"\xff\xd8\xffjpeg", webp=b"RIFF", cls="1", txt=" 2\n", image=b"\xff\xd8\xffx",
               json={"label": 2.0, "meta": {"y": 0}}, **{"label.txt": "1"})
    labels = {k: SampleFields("auto", k, NUM_CLASSES).label(s)
              for k in ("cls", "txt", "label.txt", "json:label", "json.label", "JSON:label", "json:meta.y")}
    assert labels == {"cls": 1, "txt": 2, "label.txt": 1, "json:label": 2, "json.label": 2, "JSON:label": 2,
                      "json:meta.y": 0}
    assert SampleFields("auto").image(s) == ("jpg", s["jpg"])
    assert SampleFields("webp;jpg").image(s) == ("webp", b"RIFF")
    assert SampleFields("image").image(s)[0] == "jpg"  # an unknown member name: JPEG bytes are sniffed
    for key, bad in (("label_key", "json:"), ("label_key", ""), ("label_key", "__key__"), ("image_key", ""),
                     ("image_key", "jpg png")):
        with pytest.raises(ValueError, match=f"data.{key}"):
            parse_data_config({"train_shards": "x.tar", "num_classes": 3, key: bad})


def test_hydra_override_reaches_the_data_config() -> None:
    """Every configs/data/*.yaml carries the keys (Hydra refuses overrides of keys it does not know)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        composed = compose("train", overrides=["data=fashion_mnist", "data.label_key=json:label",
                                               "data.image_key=jpg", "data.train_shards=x.tar"])
    parsed = parse_data_config(composed.data)
    assert (parsed.image_key, parsed.label_key) == ("jpg", "json:label")
    for path in sorted((CONFIGS / "data").glob("*.yaml")):
        text = path.read_text()
        assert "\nimage_key: auto" in text and "\nlabel_key: cls" in text, path.name
