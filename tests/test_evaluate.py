"""Evaluation: exact top-k (one process and 2 gloo ranks in ZeRO-3 lock-step), few-shot ridge, CLI."""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file

from vitscale.eval import evaluate_topk, extract_features, fewshot_accuracy, ridge_fit
from vitscale.evaluate import main


def _batches(logits: torch.Tensor, labels: torch.Tensor, size: int) -> list[dict]:
    """The 'image' is the logits themselves, so an identity forward makes the answer known."""
    return [{"image": logits[i:i + size], "label": labels[i:i + size]} for i in range(0, len(labels), size)]


def test_topk_counts_exactly_on_one_process():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0],   # label 0: top1 hit
                           [5.0, 4, 3, 2, 1, 0],   # label 2: top5 hit only
                           [5.0, 4, 3, 2, 1, 0],   # label 5: miss
                           [0.0, 0, 0, 0, 0, 9],   # label 5: top1 hit
                           [0.0, 1, 2, 3, 4, 5]])  # label 1: top5 hit only
    labels = torch.tensor([0, 2, 5, 5, 1])
    out = evaluate_topk(lambda x: x, _batches(logits, labels, 2), topk=(1, 5))
    assert out["top1"] == pytest.approx(2 / 5) and out["top5"] == pytest.approx(4 / 5)
    assert out["count"] == 5
    assert out["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    soft = torch.nn.functional.one_hot(labels, 6).float()  # one-hot targets give the same answer
    assert evaluate_topk(lambda x: x, _batches(logits, soft, 3), topk=(1,))["top1"] == pytest.approx(2 / 5)
    assert evaluate_topk(lambda x: x, _batches(logits[:, :3], labels.clamp(max=2), 5), topk=(5,))["top5"] == 1.0
    with pytest.raises(ValueError, match="no samples"):
        evaluate_topk(lambda x: x, [], topk=(1,))


def _lockstep_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(28, 10, generator=gen), torch.randint(0, 10, (28,), generator=gen)
    # Uneven split: rank 0 holds 24 samples (6 batches of 4), rank 1 holds 4 (1 batch).
    mine = _batches(logits[:24], labels[:24], 4) if rank == 0 else _batches(logits[24:], labels[24:], 4)
    calls = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        probe = torch.ones(1)
        dist.all_reduce(probe)  # a ZeRO-3 forward is a collective: unequal call counts would hang
        calls.append(x.shape[0])
        return x

    out = evaluate_topk(forward, mine, topk=(1, 5), device="cpu")
    gathered = [None] * world
    dist.all_gather_object(gathered, {"calls": len(calls), "out": out})
    if rank == 0:
        expected = {f"top{k}": float(logits.topk(k).indices.eq(labels[:, None]).any(1).float().mean())
                    for k in (1, 5)}
        Path(out_file).write_text(json.dumps({"ranks": gathered, "expected": expected}))
    dist.destroy_process_group()


def test_topk_is_exact_and_in_lockstep_across_two_ranks(tmp_path):
    out_file = tmp_path / "result.json"
    ctx = mp.start_processes(_lockstep_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("ranks hung: evaluate_topk is not in lock-step")
    result = json.loads(out_file.read_text())
    ranks, expected = result["ranks"], result["expected"]
    assert ranks[0]["calls"] == ranks[1]["calls"] == 6  # rank 1 forwarded 5 dummy batches
    for r in ranks:
        assert r["out"]["count"] == 28
        assert r["out"]["top1"] == pytest.approx(expected["top1"])
        assert r["out"]["top5"] == pytest.approx(expected["top5"])


def test_ridge_primal_and_dual_agree():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randn(12, 3, generator=gen,
                                                                               dtype=torch.float64)
    primal = ridge_fit(x, y, 0.3)  # N > D
    dual = x.T @ torch.linalg.solve(x @ x.T + 0.3 * torch.eye(12, dtype=x.dtype), y)
    assert torch.allclose(primal, dual, atol=1e-10)
    wide = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    w = ridge_fit(wide, y[:4], 0.3)  # N < D: dual form
    assert torch.allclose(w, torch.linalg.solve(wide.T @ wide + 0.3 * torch.eye(9, dtype=x.dtype), wide.T @ y[:4]),
                          atol=1e-10)


def _clustered(n_per_class: int, num_classes: int, dim: int, spread: float, noise_seed: int):
    """Gaussian blobs around fixed class centres (the same centres for every call)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)) * 5
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(y), dim, generator=torch.Generator().manual_seed(noise_seed))
    return centres[y] + spread * noise, y


def test_fewshot_separable_is_perfect_and_random_is_chance():
    train_x, train_y = _clustered(30, 10, 64, 1.0, noise_seed=1)
    test_x, test_y = _clustered(50, 10, 64, 1.0, noise_seed=2)
    out = fewshot_accuracy(train_x, train_y, test_x, test_y, shots=(1, 5), seeds=(0, 1, 2), num_classes=10)
    assert out["1shot"] > 0.97 and out["5shot"] == pytest.approx(1.0)

    gen = torch.Generator().manual_seed(3)
    noise_x, noise_y = torch.randn(300, 64, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    chance = fewshot_accuracy(noise_x[:200], noise_y[:200], noise_x[200:], noise_y[200:], shots=(5,),
                              seeds=range(5), num_classes=10)
    assert 0.0 <= chance["5shot"] < 0.25 and chance["5shot_std"] >= 0.0
    with pytest.raises(ValueError, match="25-shot needs 25 training images per class"):
        fewshot_accuracy(noise_x[:20], noise_y[:20], noise_x, noise_y, shots=(25,), num_classes=10)


def test_extract_features_stops_when_every_class_is_full():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    batches = _batches(torch.arange(8.0)[:, None], labels, 2)
    x, y = extract_features(lambda im: im, batches, max_per_class=2, num_classes=2)
    assert y.tolist() == [0, 1, 0, 1] and x.flatten().tolist() == [0, 1, 2, 3]


def _write_shards(root: Path, prefix: str, per_class: int, num_shards: int, seed: int) -> str:
    """Grey 28 px images whose brightness encodes the class (4 classes): easy, but needs the pixels."""
    rng = np.random.default_rng(seed)
    samples = [(c, i) for c in range(4) for i in range(per_class)]
    rng.shuffle(samples)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        with wds.TarWriter(str(root / f"{prefix}-{s:06d}.tar")) as tw:
            for c, i in samples[s::num_shards]:
                pixels = np.clip(40 + 55 * c + rng.normal(0, 6, (28, 28)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels, mode="L").save(buf, format="PNG")
                tw.write({"__key__": f"{prefix}_{c}_{i}", "png": buf.getvalue(), "cls": str(c).encode()})
    return str(root / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def test_cli_on_an_export_alone(tmp_path):
    from vitscale.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=28, patch_size=7, in_chans=1, num_classes=4, embed_dim=64,
                         depth=2, num_heads=2)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
    (export / "model_config.json").write_text(json.dumps(model.config))
    (export / "train_config.yaml").write_text("data:\n  mean: [0.5]\n  std: [0.5]\n")
    train = _write_shards(tmp_path / "shards", "train", 20, 2, seed=0)
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"num_classes": 4}))  # caps the few-shot pool
    val = _write_shards(tmp_path / "shards", "val", 10, 2, seed=1)
    out_json = tmp_path / "result.json"
    results = main(["--weights", str(export), "--train-shards", train, "--val-shards", val, "--shots", "1", "5",
                    "--seeds", "2", "--topk", "--batch-size", "16", "--json", str(out_json)])
    assert results["eval/count"] == 40.0 and 0.0 <= results["eval/top1"] <= 1.0
    assert results["fewshot/5shot"] > 0.5  # brightness survives a random ViT: well above 0.25 chance
    assert json.loads(out_json.read_text())["fewshot/1shot"] == results["fewshot/1shot"]
    only_top = main(["--weights", str(export), "--val-shards", val, "--topk", "--prefix", "test_"])
    assert only_top["test_top1"] == results["eval/top1"] and set(only_top) == {
        "test_top1", "test_top5", "test_loss", "test_count"}
    with pytest.raises(SystemExit, match="--shots needs --train-shards"):
        main(["--weights", str(export), "--val-shards", val, "--shots", "1"])


def test_extract_features_rejects_labels_beyond_num_classes():
    batches = _batches(torch.zeros(4, 1), torch.tensor([0, 1, 2, 3]), 4)
    with pytest.raises(ValueError, match="label 3 out of range for 2 classes"):
        extract_features(lambda im: im, batches, max_per_class=1, num_classes=2)


def test_checkpoint_alone_is_evaluated_with_its_training_preprocessing(tmp_path):
    """The CLI rebuilds eval preprocessing from the export's train_config.yaml: a 28 px dataset trained
    with eval_crop_pct=1.0 must not be center-cropped at timm's 0.875 (that cost 3.4 points here)."""
    from vitscale.eval import EvalPreprocessing, training_preprocessing

    assert training_preprocessing(tmp_path, 3) == EvalPreprocessing((0.5,) * 3, (0.5,) * 3, 0.875)
    (tmp_path / "train_config.yaml").write_text("data:\n  mean: [0.286]\n  std: [0.353]\n  eval_crop_pct: 1.0\n")
    assert training_preprocessing(tmp_path, 1) == EvalPreprocessing((0.286,), (0.353,), 1.0)


def _tiny_export(root: Path) -> Path:
    from vitscale.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=28, patch_size=7, in_chans=1, num_classes=4, embed_dim=32,
                         depth=1, num_heads=2)
    root.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    (root / "model_config.json").write_text(json.dumps(model.config))
    return root


def test_cli_fails_when_a_shard_is_cut_short(tmp_path):
    """Issue 12: a damaged tar header made the CLI report `eval/count` over half a shard, exit 0.
    Now a damaged tar, or a count other than the manifest's, stops it (data.max_bad_shards=0)."""
    from vitscale.data import BadShardsError

    export = _tiny_export(tmp_path / "export")
    val = _write_shards(tmp_path / "shards", "val", 10, 2, seed=1)
    first = tmp_path / "shards" / "val-000000.tar"
    entries = [{"name": p.name, "num_samples": 20, "bytes": p.stat().st_size}
               for p in sorted(first.parent.glob("*.tar"))]
    entries[1]["num_samples"] = 21  # the manifest knows of one sample more than the tar holds
    (first.parent / "manifest.json").write_text(json.dumps({"splits": {"val": {"shards": entries}}}))
    with pytest.raises(BadShardsError, match="val-000001.tar: unreadable after 20 samples .*manifest.json says 21"):
        main(["--weights", str(export), "--val-shards", val, "--topk"])
    (first.parent / "manifest.json").unlink()
    with tarfile.open(first) as tar:
        offset = tar.getmembers()[20].offset
    data = bytearray(first.read_bytes())
    data[offset + 100:offset + 108] = b"\xff" * 8  # a damaged member header: tarfile stops there quietly
    first.write_bytes(bytes(data))
    with pytest.raises(BadShardsError, match="damaged member header"):
        main(["--weights", str(export), "--val-shards", val, "--topk"])
