"""CLI: evaluate a checkpoint alone (top-k of its own head, and the paper's few-shot linear probe).

    python -m vitscale.evaluate --weights models:/vit@best --train-shards 'train-{000000..000009}.tar' \
        --val-shards 'test-{000000..000001}.tar' --shots 1 5 10 --topk

Single process; the architecture comes from model_config.json and the preprocessing from
train_config.yaml. Only argument handling lives here: the library is vitscale.eval (the engine uses it
too). A missing model, alias, version, run or store is one line on stderr (exit 1), naming the store.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vitscale.eval import (
    evaluate_topk, extract_features, fewshot_accuracy, load_model, manifest_num_classes, training_preprocessing,
)

PROG = "python -m vitscale.evaluate"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
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
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="top-k progress line every SECONDS of wall time (0: every batch)")
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

    if args.run_id:  # before minutes of evaluation, not after
        from vitscale.tracking import require_run

        require_run(args.run_id)
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
        top = evaluate_topk(lambda x: model(x.to(device)), loader(args.val_shards), device="cpu",
                            progress_every_s=args.progress_every)
        results |= {f"{args.prefix}{k}": v for k, v in top.items()}
    if args.shots:
        num_classes = args.num_classes or manifest_num_classes(args.train_shards) or None
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


def cli(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``main`` with the errors a user fixes (missing model / run / store / file, bad shards) as one line."""
    from vitscale.console import setup_console
    from vitscale.data import BadShardsError, ShardListError
    from vitscale.data.shards import ShardReadError
    from vitscale.tracking import one_line_errors

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup_console()
    with one_line_errors(PROG, (BadShardsError, ShardListError, ShardReadError, ValueError)):
        results = main(argv)
    return results


if __name__ == "__main__":
    cli(sys.argv[1:])
