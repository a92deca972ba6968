"""Send what a training job could not: its unsent model registrations and metrics.

When the tracking server is down until a job ends, the tracker writes them under
``output_dir/tracking/`` (``unsent_registrations.jsonl``, ``unsent_metrics.jsonl``) and its last
warning prints the command that completes them:

    python -m vitscale.tracking.replay OUTPUT_DIR/tracking

Each registration line holds everything ``register_export`` needs (export directory, model name,
step, metrics, aliases, tags) plus the run and the server it was meant for. Lines that are sent are
removed from the files; a line that fails stays, so the command can simply be run again.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vitscale.tracking.settings import RUN_ID_FILE, TrackingSettings

log = logging.getLogger("vitscale.tracking")
UNSENT_REGISTRATIONS = "unsent_registrations.jsonl"
UNSENT_METRICS = "unsent_metrics.jsonl"


def replay_command(tracking_dir: Path) -> str:
    return f"{shlex.quote(sys.executable)} -m vitscale.tracking.replay {shlex.quote(str(Path(tracking_dir).resolve()))}"


def write_unsent_registrations(tracking_dir: Path, records: Iterable[dict[str, Any]], *, run_id: str | None,
                               settings: TrackingSettings, tracking_uri: str) -> Path:
    """Append one JSON line per registration, with the run/server it belongs to and the command."""
    path = Path(tracking_dir) / UNSENT_REGISTRATIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for record in records:
            fh.write(json.dumps({**record, "run_id": run_id, "tracking_uri": tracking_uri,
                                 "registry_uri": settings.registry_uri or tracking_uri,
                                 "experiment": settings.experiment, "command": replay_command(tracking_dir)}) + "\n")
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _rewrite(path: Path, lines: list[dict[str, Any]]) -> None:
    if lines:
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    else:
        path.unlink(missing_ok=True)


def _run_for(client: Any, record: dict[str, Any], tracking_dir: Path) -> str:
    """The run a registration belongs to; a job whose run was never created gets one now."""
    if record.get("run_id"):
        return str(record["run_id"])
    recorded = tracking_dir / RUN_ID_FILE
    if recorded.is_file():
        return recorded.read_text().strip()
    name = record.get("experiment") or "vitscale"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=f"replay-{Path(record['export_dir']).name}",
                            tags={"vitscale.replayed_from": str(tracking_dir)})
    client.set_terminated(run.info.run_id, "FINISHED")
    recorded.write_text(run.info.run_id)
    return run.info.run_id


def replay(tracking_dir: Path, *, tracking_uri: str | None = None) -> tuple[int, int]:
    """Send the registrations and metrics saved under ``tracking_dir``; returns (sent, still unsent)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from vitscale.tracking.registry import register_export

    tracking_dir = Path(tracking_dir)
    sent = 0
    regs_path = tracking_dir / UNSENT_REGISTRATIONS
    left: list[dict[str, Any]] = []
    records = _read(regs_path)
    metrics_uri = tracking_uri or next((r["tracking_uri"] for r in records if r.get("tracking_uri")), None)
    for record in records:
        uri = tracking_uri or record["tracking_uri"]
        client = MlflowClient(tracking_uri=uri, registry_uri=tracking_uri or record.get("registry_uri") or uri)
        try:
            run_id = _run_for(client, record, tracking_dir)
            version = register_export(client, run_id, Path(record["export_dir"]), record["name"],
                                      step=record.get("step"), metrics=record.get("metrics"),
                                      best_metric=record.get("best_metric"), mode=record.get("mode", "max"),
                                      aliases=record.get("aliases", ()), tags=record.get("tags"))
        except Exception as exc:  # noqa: BLE001 - keep the line and report it in one line
            log.error("not registered %s from %s: %s: %s", record["name"], record["export_dir"],
                      type(exc).__name__, " ".join(str(exc).split())[:300])
            left.append(record)
            continue
        print(f"registered {version.describe()} from {record['export_dir']}")
        sent += 1
    _rewrite(regs_path, left)
    metrics_path = tracking_dir / UNSENT_METRICS
    metrics = _read(metrics_path)
    run_file = tracking_dir / RUN_ID_FILE
    if metrics and run_file.is_file() and metrics_uri:
        client = MlflowClient(tracking_uri=metrics_uri)
        batch = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in metrics]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_file.read_text().strip(), metrics=batch[i:i + 1000])
        print(f"logged {len(batch)} metrics to run {run_file.read_text().strip()}")
        _rewrite(metrics_path, [])
        sent += len(batch)
    elif metrics:
        left.extend(metrics)
        print(f"{len(metrics)} metrics in {metrics_path} kept: pass --tracking-uri (and keep {run_file})")
    return sent, len(left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tracking_dir", type=Path, help="OUTPUT_DIR/tracking (or one of its .jsonl files)")
    parser.add_argument("--tracking-uri", help="send there instead of the server recorded in each line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    folder = args.tracking_dir.parent if args.tracking_dir.suffix == ".jsonl" else args.tracking_dir
    sent, left = replay(folder, tracking_uri=args.tracking_uri)
    print(f"{sent} sent, {left} left in {folder}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
