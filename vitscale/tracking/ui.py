"""Where to look at runs: the MLflow UI address of an experiment's runs list.

MLflow 3.17's UI opens an experiment in its GenAI "Traces" view, which is empty for training runs;
``?workflowType=machine_learning`` lands on the runs list instead. Every run start logs this URL and
``python -m vitscale.tracking.ui`` prints it (with the command that starts a UI for a local store), so
the demo and the docs never hand out a link to an empty page.

    python -m vitscale.tracking.ui [--experiment vitscale] [--port 5000]
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from vitscale.tracking.stores import ENV_VAR, one_line_errors, require_store, sqlite_path, uri_origin
from vitscale.tracking.uris import is_local_store, resolve_tracking_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
WORKFLOW_QUERY = "workflowType=machine_learning"


def ui_base(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The UI's address: the server itself (credentials removed), or where ``mlflow ui`` will listen
    for a local store."""
    if is_local_store(tracking_uri):
        return f"http://{host}:{port}"
    return re.sub(r"^(\w+://)[^@/]*@", r"\1", tracking_uri).rstrip("/")


def experiment_url(tracking_uri: str, experiment_id: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """``BASE/#/experiments/<id>?workflowType=machine_learning``: the runs list, not the Traces view."""
    return f"{ui_base(tracking_uri, host, port)}/#/experiments/{experiment_id}?{WORKFLOW_QUERY}"


def ui_command(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str | None:
    """The ``mlflow ui`` command serving a local store (None for a server, which serves itself)."""
    if not is_local_store(tracking_uri):
        return None
    mlflow = Path(sys.executable).with_name("mlflow")
    exe = str(mlflow) if mlflow.is_file() else "mlflow"
    return (f"{shlex.quote(exe)} ui --backend-store-uri {shlex.quote(tracking_uri)} --host {host} "
            f"--port {port}")


def ui_hint(tracking_uri: str, experiment_id: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """One line for a log: the runs-list URL, and how to start a UI when nothing serves the store."""
    url = experiment_url(tracking_uri, experiment_id, host, port)
    command = ui_command(tracking_uri, host, port)
    return f"{url} (start the UI with: {command})" if command else url


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Print the store, the `export` line that points later commands at it, and the UI lines."""
    p = argparse.ArgumentParser(prog="python -m vitscale.tracking.ui", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="vitscale", help="experiment name (tracking.experiment)")
    p.add_argument("--tracking-uri", help=f"default: ${ENV_VAR}, else sqlite:///mlflow.db")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = p.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    require_store(uri, f"looking up experiment {args.experiment!r}")
    from mlflow import MlflowClient

    from vitscale.tracking.stores import TrackingNotFound, describe_store

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
    lines.append(f"Runs of experiment {args.experiment!r}: {experiment_url(uri, exp.experiment_id, args.host, args.port)}")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    with one_line_errors("python -m vitscale.tracking.ui"):
        main(sys.argv[1:])
