"""Where to look at runs: the MLflow UI address of an experiment's runs list.

MLflow 3.17's UI opens an experiment in its GenAI "Traces" view, which is empty for training runs;
``?workflowType=machine_learning`` lands on the runs list instead. Every run start logs this URL and
``python -m vitscale.tracking.where`` prints it (with the command that starts a UI for a local store), so
the demo and the docs never hand out a link to an empty page.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from vitscale.tracking.uris import is_local_store

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
