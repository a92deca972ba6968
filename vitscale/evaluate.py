"""Evaluation: exact top-k over a sharded validation set, and the paper's few-shot linear probe.

Top-k counts are summed over ranks, so the number is exact over the whole set however it was split.
Under ZeRO-3 every forward is a collective (parameters are gathered layer by layer), so a rank that
runs out of data early would hang the others: every rank therefore runs the same number of forwards,
and a rank without data forwards a dummy batch whose outputs are discarded.

Few-shot (Dosovitskiy et al. 2020, section 4.1): frozen pre-logit features, a closed-form regularised
least-squares map to {-1, 1}^K targets fitted on k images per class, accuracy on the full test split,
averaged over several random draws of the k-shot subset.

CLI (single process, a checkpoint alone is enough; the architecture comes from model_config.json):
    python -m vitscale.evaluate --weights models:/vit@best --train-shards 'train-{000000..000009}.tar' \
        --val-shards 'test-{000000..000001}.tar' --shots 1 5 10 --topk
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)
ForwardFn = Callable[[torch.Tensor], torch.Tensor]
# big_vision's few-shot bias feature: a large constant column makes the bias almost unregularised.
BIAS_FEATURE = 100.0


# ------------------------------------------------------------------------------------------- top-k
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(device: torch.device | str | None) -> torch.device:
    """Where collective tensors live: NCCL needs CUDA tensors, gloo CPU ones."""
    if device is not None and torch.device(device).type != "meta":
        return torch.device(device)
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def evaluate_topk(
    forward_fn: ForwardFn,
    loader: Iterable[Mapping[str, Any]],
    *,
    topk: Sequence[int] = (1, 5),
    device: torch.device | str | None = None,
    input_shape: Sequence[int] | None = None,
) -> dict[str, float]:
    """{"top1", "top5", ..., "loss", "count"} over every sample of every rank's `loader`.

    `loader` yields {"image": (B, C, H, W), "label": (B,) or one-hot/soft (B, K)}; `forward_fn` maps
    images to logits (it moves/casts them). `input_shape` (C, H, W) shapes the dummy batch of a rank
    that has no data at all; otherwise its last real batch is reused.
    """
    ks = sorted({int(k) for k in topk})
    if not ks or ks[0] < 1:
        raise ValueError(f"topk must be positive integers, got {list(topk)}")
    comm = _comm_device(device)
    distributed = _distributed()
    correct = torch.zeros(len(ks), dtype=torch.float64)
    count, loss_sum = 0, 0.0
    template: torch.Tensor | None = None
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if distributed:
            flag = torch.tensor([0 if batch is None else 1], device=comm)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) == 0:
                break
        elif batch is None:
            break
        if batch is None:  # lock-step filler: same collectives as the ranks that still have data
            if template is None:
                if input_shape is None:
                    raise ValueError("evaluate_topk: this rank has no validation data; pass input_shape=(C, H, W) "
                                     "so it can forward a dummy batch in lock-step with the others")
                template = torch.zeros(1, *input_shape)
            forward_fn(template)
            continue
        images, labels = batch["image"], batch["label"]
        template = images[:1]
        logits = forward_fn(images).float()
        labels = labels.to(logits.device)
        if labels.ndim == 2:  # one-hot / smoothed targets: the class is the argmax
            labels = labels.argmax(dim=1)
        maxk = min(ks[-1], logits.shape[1])
        hits = logits.topk(maxk, dim=1).indices.eq(labels[:, None])
        for i, k in enumerate(ks):
            correct[i] += hits[:, :min(k, maxk)].any(dim=1).sum().item()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.shape[0]
    totals = torch.cat([correct, torch.tensor([count, loss_sum], dtype=torch.float64)]).to(comm)
    if distributed:
        dist.all_reduce(totals)
    totals = totals.cpu()
    n = int(totals[-2].item())
    if n == 0:
        raise ValueError("evaluate_topk: the validation loader yielded no samples on any rank")
    out = {f"top{k}": float(totals[i] / n) for i, k in enumerate(ks)}
    out |= {"loss": float(totals[-1] / n), "count": float(n)}
    return out


# ---------------------------------------------------------------------------------------- few-shot
@torch.no_grad()
def extract_features(
    feature_fn: ForwardFn,
    loader: Iterable[Mapping[str, Any]],
    *,
    max_per_class: int | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F) float32 features and (N,) labels on CPU.

    With `max_per_class` (and `num_classes`) extraction stops once every class has that many, so a
    k-shot pool is drawn from a few thousand images rather than the whole training set.
    """
    feats, labels, seen = [], [], torch.zeros(num_classes or 0, dtype=torch.long)
    for batch in loader:
        y = batch["label"]
        y = (y.argmax(dim=1) if y.ndim == 2 else y).long().cpu()
        keep = torch.ones_like(y, dtype=torch.bool)
        if max_per_class is not None and num_classes:
            if len(y) and int(y.max()) >= len(seen):
                raise ValueError(f"label {int(y.max())} out of range for {len(seen)} classes: pass the "
                                 "dataset's class count (--num-classes)")
            for i, c in enumerate(y.tolist()):
                keep[i] = seen[c] < max_per_class
                seen[c] += int(keep[i])
            if not keep.any():
                if bool((seen >= max_per_class).all()):
                    break
                continue
        feats.append(feature_fn(batch["image"]).float().cpu()[keep])
        labels.append(y[keep])
        if max_per_class is not None and num_classes and bool((seen >= max_per_class).all()):
            break
    if not feats:
        raise ValueError("extract_features: the loader yielded no samples")
    return torch.cat(feats), torch.cat(labels)


def ridge_fit(x: torch.Tensor, targets: torch.Tensor, l2_reg: float) -> torch.Tensor:
    """argmin_W ||xW - targets||^2 + l2_reg ||W||^2, solved in whichever of the primal (D x D) and
    dual (N x N) forms is smaller: k-shot problems have far fewer samples than feature dimensions."""
    n, d = x.shape
    if n >= d:
        return torch.linalg.solve(x.T @ x + l2_reg * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + l2_reg * torch.eye(n, dtype=x.dtype), targets)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, num_classes: int, l2_reg: float = 1.0) -> float:
    """Fit ridge regression to {-1, 1}^K targets on (whitened) train features; test accuracy."""
    mean = train_x.double().mean(dim=0, keepdim=True)
    std = train_x.double().std(dim=0, unbiased=False, keepdim=True) + 1e-5

    def prepare(x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - mean) / std
        return torch.cat([z, torch.full((z.shape[0], 1), BIAS_FEATURE, dtype=z.dtype)], dim=1)

    targets = 2.0 * F.one_hot(train_y.long(), num_classes).double() - 1.0
    weights = ridge_fit(prepare(train_x), targets, l2_reg)
    predictions = (prepare(test_x) @ weights).argmax(dim=1)
    return float((predictions == test_y.long()).double().mean())


def fewshot_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
    shots: Sequence[int] = (1, 5, 10, 25), seeds: Sequence[int] = (0, 1, 2), num_classes: int | None = None,
    l2_reg: float = 1.0,
) -> dict[str, float]:
    """{"{k}shot": mean accuracy over seeds, "{k}shot_std": its spread} for every k in `shots`."""
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    pools = [torch.nonzero(train_y == c).flatten() for c in range(num_classes)]
    out: dict[str, float] = {}
    for k in shots:
        short = [(c, len(p)) for c, p in enumerate(pools) if len(p) < k]
        if short:
            raise ValueError(f"{k}-shot needs {k} training images per class; classes (class, have) {short[:5]} "
                             "have fewer: raise --max-per-class or use other shards")
        accs = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed) * 7919 + int(k))
            idx = torch.cat([p[torch.randperm(len(p), generator=gen)[:k]] for p in pools])
            accs.append(linear_probe_accuracy(train_x[idx], train_y[idx], test_x, test_y, num_classes, l2_reg))
        mean = sum(accs) / len(accs)
        out[f"{k}shot"] = mean
        out[f"{k}shot_std"] = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return out


# --------------------------------------------------------------------------------------------- CLI
def load_model(weights: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """(model in eval mode, its config, ResolvedWeights) from any URI resolve_weights accepts."""
    from safetensors.torch import load_file

    from vitscale.models import create_model
    from vitscale.tracking import resolve_weights

    resolved = resolve_weights(weights)
    config = json.loads((resolved.path / "model_config.json").read_text())
    model = create_model(**config)
    model.load_state_dict(load_file(str(resolved.path / "model.safetensors")))
    return model.to(device).eval(), config, resolved


@dataclass(frozen=True)
class EvalPreprocessing:
    """How the model saw evaluation images in training (train_config.yaml's data.*): evaluating a
    checkpoint alone must use the same normalisation and crop, or its top-1 silently drops."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    image_key: str = "auto"  # which sample members hold the image and the label (data.image_key / label_key)
    label_key: str = "cls"


def training_preprocessing(export_dir: Path, in_chans: int) -> EvalPreprocessing:
    """train_config.yaml's data.mean / std / eval_crop_pct / image_key / label_key, else
    0.5 / 0.5 / 0.875 / auto / cls."""
    default = (0.5,) * in_chans
    path = export_dir / "train_config.yaml"
    if not path.is_file():
        return EvalPreprocessing(default, default)
    import yaml

    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    return EvalPreprocessing(tuple(data.get("mean") or default), tuple(data.get("std") or default),
                             float(data.get("eval_crop_pct") or 0.875), str(data.get("image_key") or "auto"),
                             str(data.get("label_key") or "cls"))


def _manifest_num_classes(shards: str) -> int | None:
    """Class count from data_tools' manifest.json beside the shards (the probe's dataset, which need
    not be the one the model's head was trained on)."""
    path = Path(shards.split("::")[0].split("{")[0]).parent / "manifest.json"
    try:
        return int(json.loads(path.read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vitscale.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="models:/NAME@alias, models:/NAME/V, runs:/ID[/path] or a dir")
    p.add_argument("--val-shards", required=True, help="shard pattern of the test/validation split")
    p.add_argument("--train-shards", help="shard pattern the few-shot images are drawn from")
    p.add_argument("--shots", type=int, nargs="*", default=[], help="few-shot k values, e.g. 1 5 10 25")
    p.add_argument("--seeds", type=int, default=3, help="random k-shot draws per k (mean and std reported)")
    p.add_argument("--l2-reg", type=float, default=1.0, help="ridge penalty on whitened features")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="few-shot pool per class (default 5 x max shots)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the few-shot dataset (default: manifest.json beside the train shards)")
    p.add_argument("--image-key", default=None,
                   help="sample member(s) holding the image: auto (jpg/jpeg/png/webp), jpg, 'jpg;png' "
                        "(default: the training config's data.image_key, else auto)")
    p.add_argument("--label-key", default=None,
                   help="member holding the class index (cls, txt) or a json field (json:label) "
                        "(default: the training config's data.label_key, else cls)")
    p.add_argument("--topk", action="store_true", help="also top-1/top-5 of the model's own head")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefix", default="eval/", help="name prefix of the top-k metrics (e.g. test_ -> test_top1)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--run-id", help="log the results as metrics to this MLflow run")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = _parser().parse_args(argv)
    if args.shots and not args.train_shards:
        raise SystemExit("--shots needs --train-shards (the images the k-shot probes are fitted on)")
    if not args.shots and not args.topk:
        raise SystemExit("nothing to do: give --shots K [K ...] and/or --topk")
    from vitscale.data import build_eval_loader

    device = torch.device(args.device)
    model, config, resolved = load_model(args.weights, device)
    in_chans, img_size = int(config["in_chans"]), config["img_size"]
    prep = training_preprocessing(resolved.path, in_chans)

    def loader(urls: str):
        return build_eval_loader(urls, batch_size=args.batch_size, rank=0, world_size=1, img_size=img_size,
                                 in_chans=in_chans, num_workers=args.num_workers, mean=prep.mean, std=prep.std,
                                 crop_pct=prep.crop_pct, image_key=args.image_key or prep.image_key,
                                 label_key=args.label_key or prep.label_key)

    results: dict[str, float] = {}
    if args.topk:
        top = evaluate_topk(lambda x: model(x.to(device)), loader(args.val_shards), device="cpu")
        results |= {f"{args.prefix}{k}": v for k, v in top.items()}
    if args.shots:
        num_classes = args.num_classes or _manifest_num_classes(args.train_shards) or None
        pool = args.max_per_class or 5 * max(args.shots)
        features = lambda x: model.pre_logits(x.to(device))  # noqa: E731
        train_x, train_y = extract_features(features, loader(args.train_shards), max_per_class=pool,
                                            num_classes=num_classes)
        test_x, test_y = extract_features(features, loader(args.val_shards))
        num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
        shots = fewshot_accuracy(train_x, train_y, test_x, test_y, shots=args.shots, seeds=range(args.seeds),
                                 num_classes=num_classes, l2_reg=args.l2_reg)
        results |= {f"fewshot/{k}": v for k, v in shots.items()}
    for key, value in results.items():
        print(f"{key:24s} {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"weights": args.weights, "version": resolved.version, **results}, indent=2))
    if args.run_id:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        from vitscale.tracking import resolve_tracking_uri

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in results.items()]
        MlflowClient(resolve_tracking_uri()).log_batch(args.run_id, metrics=metrics)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
