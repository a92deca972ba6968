"""Which MLflow store a command talks to, and one-line errors when what it asks for is not there.

MLflow creates an empty sqlite store on first contact with a missing file. For a writer (a training
run) that is the point; for a reader (``python -m vitscale.evaluate --weights models:/...``) it hides
the real mistake, usually running in another directory than the one that holds the store (the demo
writes ``demo_work/mlflow.db``). Readers therefore call ``require_store`` first, and every lookup
failure is a ``TrackingNotFound`` whose text names the thing and the store (path and where the URI
came from), so the CLIs can print it as one line.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from vitscale.tracking.reach import TrackingAuthError, TrackingUnreachable, server_of
from vitscale.tracking.uris import DEFAULT_TRACKING_URI

ENV_VAR = "MLFLOW_TRACKING_URI"
STORE_FILE = "mlflow.db"


class TrackingNotFound(LookupError):
    """A registered model, alias, version, run or the store itself does not exist; ``str()`` is one
    line naming it and the store that was searched."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, absolute (relative URIs are relative to the working
    directory, as MLflow reads them); None for servers and other stores."""
    m = re.match(r"^sqlite:///(?P<path>[^?]*)", uri)
    if not m or not m["path"] or m["path"] == ":memory:":
        return None
    return Path(unquote(m["path"])).expanduser().resolve()


def uri_origin(tracking_uri: str) -> str:
    """Where this URI came from, for messages: the variable, or the project default."""
    if os.environ.get(ENV_VAR) == tracking_uri:
        return f"from ${ENV_VAR}"
    if tracking_uri == DEFAULT_TRACKING_URI and not os.environ.get(ENV_VAR):
        return f"the default: ${ENV_VAR} is unset"
    return "from tracking.uri"


def describe_store(uri: str) -> str:
    """``sqlite:///mlflow.db = /abs/mlflow.db`` for a local store, the credential-free server otherwise."""
    path = sqlite_path(uri)
    if path is None:
        return server_of(uri)
    return uri if uri.startswith(f"sqlite:///{path}") else f"{uri} = {path}"


def _other_stores(missing: Path) -> list[Path]:
    """``mlflow.db`` files one folder below the working directory (``demo_work/mlflow.db``): the store
    the user most likely meant, to name in the error."""
    try:
        found = sorted(p.resolve() for p in Path.cwd().glob(f"*/{STORE_FILE}") if p.is_file())
    except OSError:
        return []
    return [p for p in found if p != missing][:3]


def require_store(uri: str, what: str) -> None:
    """Raise TrackingNotFound (one line) when ``uri`` is a sqlite store whose file does not exist,
    before MLflow would create an empty one. Servers are checked by the request itself."""
    path = sqlite_path(uri)
    if path is None or path.is_file():
        return
    hint = ""
    others = _other_stores(path)
    if others:
        hint = f"; did you mean `export {ENV_VAR}=sqlite:///{others[0]}`?"
    raise TrackingNotFound(f"no MLflow store at {path} ({uri}, {uri_origin(uri)}) while {what}; nothing was "
                           f"created: set {ENV_VAR} (or tracking.uri) to the store the run used{hint}")


_CLI_ERRORS: tuple[type[BaseException], ...] = (LookupError, FileNotFoundError, TrackingUnreachable,
                                                TrackingAuthError)


@contextlib.contextmanager
def one_line_errors(prog: str, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """For a CLI's ``__main__``: a missing model / alias / version / run / store / file (and ``extra``,
    e.g. bad shards) becomes ``prog: error: <message>`` on stderr and exit status 1, not a traceback.
    Library callers get the exceptions themselves."""
    try:
        yield
    except (*_CLI_ERRORS, *extra) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {text}", file=sys.stderr)
        raise SystemExit(1) from None
