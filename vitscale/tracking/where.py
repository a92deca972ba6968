"""Where a job's runs went: the store, the `export` line for later commands, and the UI's runs list.

    python -m vitscale.tracking.where [--experiment vitscale] [--tracking-uri URI] [--port 5000]

The demo ends with it, so the next command (``python -m vitscale.evaluate --weights models:/...``,
``mlflow ui``) uses the store the demo wrote instead of an empty ``./mlflow.db``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from vitscale.tracking.stores import (
    ENV_VAR, TrackingNotFound, describe_store, one_line_errors, require_store, sqlite_path, uri_origin,
)
from vitscale.tracking.ui import DEFAULT_HOST, DEFAULT_PORT, experiment_url, ui_command
from vitscale.tracking.uris import resolve_tracking_uri

PROG = "python -m vitscale.tracking.where"


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Print the store, the `export` line that points later commands at it, and the UI lines."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="vitscale", help="experiment name (tracking.experiment)")
    p.add_argument("--tracking-uri", help=f"default: ${ENV_VAR}, else sqlite:///mlflow.db")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = p.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    require_store(uri, f"looking up experiment {args.experiment!r}")
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(args.experiment)
    if exp is None:
        raise TrackingNotFound(f"no MLflow experiment {args.experiment!r} in the store {describe_store(uri)} "
                               f"({uri_origin(uri)})")
    path = sqlite_path(uri)
    lines = [f"MLflow store: {uri}" + (f" ({path})" if path and not uri.endswith(str(path)) else ""),
             f"Use it in later commands: export {ENV_VAR}={shlex.quote(uri if path is None else f'sqlite:///{path}')}"]
    command = ui_command(uri, args.host, args.port)
    if command:
        lines.append(f"Start the UI: {command}")
    url = experiment_url(uri, exp.experiment_id, args.host, args.port)
    lines.append(f"Runs of experiment {args.experiment!r}: {url}")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    with one_line_errors(PROG):
        main(sys.argv[1:])
