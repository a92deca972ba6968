"""CLI: draw a run's pictures (training curves, the paper's Figure 7 panels) from a checkpoint alone.

    python -m vitscale.figures --weights models:/vit@best --shards 'test-{000000..000001}.tar' \
        --metrics outputs/run/metrics.jsonl --out figures/ [--run-id RUN_ID]

Only argument handling lives here; the drawing is vitscale.eval.figures (the Trainer uses it too).
A missing model, alias, version, run or store is one line on stderr (exit 1), naming the store.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitscale.eval.figures import first_images, model_figures, plot_training_curves, read_metrics
from vitscale.eval.weights import load_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROG = "python -m vitscale.figures"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figures of a checkpoint (and its metrics.jsonl) into --out, optionally into a run."""
    p = argparse.ArgumentParser(prog=PROG, description="Figure 7 panels and curves")
    p.add_argument("--weights", help="models:/NAME@alias, models:/NAME/V, runs:/ID[/path] or an export dir")
    p.add_argument("--shards", help="images for the attention-distance panel (e.g. the validation shards)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--metrics", type=Path, help="metrics.jsonl for the training curves")
    p.add_argument("--out", type=Path, default=Path("figures"))
    p.add_argument("--run-id", help="also log the PNGs to this MLflow run under figures/")
    args = p.parse_args(argv)
    if not args.weights and not args.metrics:
        p.error("give --weights and/or --metrics")
    if args.run_id:  # before drawing anything, not after
        from vitscale.tracking import require_run

        require_run(args.run_id)
    figures: dict[str, Figure] = {}
    if args.metrics:
        figures["training_curves"] = plot_training_curves(read_metrics(args.metrics))
    if args.weights:
        model, config, resolved = load_model(args.weights, torch.device("cpu"))
        images = first_images(args.shards, config, resolved.path, args.num_images) if args.shards else None
        figures |= model_figures(model, images)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = args.out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
        print(path)
    if args.run_id:
        from mlflow import MlflowClient

        from vitscale.tracking import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri())
        for path in written:
            client.log_artifact(args.run_id, str(path), "figures")
    return written


def cli(argv: Sequence[str] | None = None) -> list[Path]:
    """``main`` with the errors a user fixes (missing model / run / store / file, bad shards) as one line."""
    from vitscale.data import BadShardsError, ShardListError
    from vitscale.data.shards import ShardReadError
    from vitscale.tracking import one_line_errors

    with one_line_errors(PROG, (BadShardsError, ShardListError, ShardReadError, ValueError)):
        written = main(argv)
    return written


if __name__ == "__main__":
    cli(sys.argv[1:])
