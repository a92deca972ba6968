"""Parse the weight/checkpoint URIs users type (`models:/NAME@alias`, `models:/NAME/3`, `runs:/ID/path`).

Parsing is kept apart from resolution so a typo fails in microseconds with a message that names the
accepted forms, before anything talks to a tracking server.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# MLflow run ids are 32 lowercase hex characters; registered-model names may contain most characters
# except '/' and '@' is our alias separator.
_MODEL_RE = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+|latest))/?(?P<sub>.*)$", re.IGNORECASE)
_RUN_RE = re.compile(r"^runs:/(?P<run_id>[^/]+)/?(?P<path>.*)$")

URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/PATH] or a local path"


@dataclass(frozen=True)
class ModelURI:
    """A registered-model reference: exactly one of `alias` / `version` is set.

    `latest` (as `@latest` or `/latest`) is MLflow's reserved name for the newest version, not a
    stored alias: it is normalised to `version="latest"`.
    """

    name: str
    alias: str | None = None
    version: str | None = None
    subpath: str = ""

    @property
    def latest(self) -> bool:
        return self.version == "latest"


@dataclass(frozen=True)
class RunURI:
    """An artifact path inside one run (empty path means the run itself)."""

    run_id: str
    path: str = ""


@dataclass(frozen=True)
class LocalURI:
    path: Path


ParsedURI = ModelURI | RunURI | LocalURI


def parse_uri(uri: str | Path) -> ParsedURI:
    """Classify `uri`; raise ValueError (one line, naming the accepted forms) if it is malformed."""
    if isinstance(uri, Path):
        return LocalURI(uri)
    text = str(uri).strip()
    if not text:
        raise ValueError(f"empty weights/checkpoint URI: expected {URI_FORMS}")
    if text.startswith("models:"):
        m = _MODEL_RE.match(text)
        if not m:
            raise ValueError(f"malformed model URI {text!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        alias, version = m["alias"], m["version"]
        if (alias or version or "").lower() == "latest":
            alias, version = None, "latest"
        return ModelURI(m["name"], alias=alias, version=version, subpath=m["sub"].strip("/"))
    if text.startswith("runs:"):
        m = _RUN_RE.match(text)
        if not m or not m["run_id"]:
            raise ValueError(f"malformed run URI {text!r}: expected runs:/RUN_ID[/PATH]")
        return RunURI(m["run_id"], m["path"].strip("/"))
    if text.startswith("file://"):
        return LocalURI(Path(text[len("file://"):]))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise ValueError(f"unsupported URI scheme in {text!r}: expected {URI_FORMS}")
    return LocalURI(Path(text).expanduser())


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an embedded sqlite store in the working directory."""
    if explicit:
        return str(explicit)
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_local_store(tracking_uri: str) -> bool:
    """True when no tracking server is involved (we then choose where artifacts live)."""
    return not re.match(r"^(https?|databricks)", tracking_uri)
