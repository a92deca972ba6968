"""Lineage of a fine-tune: which registered version (and which run) its weights came from.

Recorded where the MLflow UI shows it, not only as run tags: the fine-tune run's description
(``mlflow.note.content``, rendered as Markdown on the run page) and every model version the fine-tune
registers (tags ``finetune.source_*`` plus a Markdown description) link to the source version's page and
the source run's page. MLflow's registry has no parent-model field for plain artifact directories, so
tags and links are the record; the version's own ``run_id`` / ``source`` remain MLflow's link to the
fine-tune run itself.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vitscale.tracking.uris import ModelURI, RunURI, parse_uri

log = logging.getLogger("vitscale.tracking")
LINEAGE_PREFIX = "finetune.source"
NOTE_TAG = "mlflow.note.content"  # the run's Description in the MLflow UI


def lineage_of(tags: Mapping[str, str]) -> dict[str, str]:
    """The ``finetune.source*`` tags among ``tags``."""
    return {k: str(v) for k, v in tags.items() if k.startswith(LINEAGE_PREFIX)}


def newest_version(client: MlflowClient, name: str) -> str | None:
    """The highest version number of ``name``, or None when it has none (``@latest`` names nothing)."""
    quoted = name.replace("'", "\\'")
    versions = [int(v.version) for v in client.search_model_versions(f"name = '{quoted}'")]
    return str(max(versions)) if versions else None


def source_lineage(client: MlflowClient, uri: str) -> dict[str, str]:
    """Lineage tags for a fine-tune source without downloading it: which registered version
    (an alias resolved now) or run the weights come from."""
    parsed = parse_uri(uri)
    tags = {"finetune.source_uri": str(uri)}
    if isinstance(parsed, ModelURI):
        if parsed.alias:
            mv = client.get_model_version_by_alias(parsed.name, parsed.alias)
        else:
            version = newest_version(client, parsed.name) if parsed.latest else parsed.version
            if version is None:
                raise MlflowException(f"registered model {parsed.name!r} has no versions")
            mv = client.get_model_version(parsed.name, version)
        tags |= {"finetune.source_model": parsed.name, "finetune.source_version": str(mv.version)}
        if mv.run_id:
            tags["finetune.source_run_id"] = mv.run_id
    elif isinstance(parsed, RunURI):
        tags["finetune.source_run_id"] = parsed.run_id
    else:
        tags["finetune.source_path"] = str(Path(parsed.path).resolve())
    return tags


def lineage_markdown(client: MlflowClient, lineage: Mapping[str, str]) -> str | None:
    """One Markdown line linking the source version and run pages (UI-relative ``#/...`` links, so they
    work whatever host serves the UI); None without lineage."""
    if not lineage:
        return None
    parts = []
    model, version = lineage.get("finetune.source_model"), lineage.get("finetune.source_version")
    if model and version:
        parts.append(f"[models:/{model}/{version}](#/models/{quote(model, safe='')}/versions/{version})")
    run_id = lineage.get("finetune.source_run_id")
    if run_id:
        try:
            experiment = client.get_run(run_id).info.experiment_id
            parts.append(f"run [{run_id}](#/experiments/{experiment}/runs/{run_id})")
        except MlflowException as exc:  # the source run may live in another store
            log.debug("source run %s not in this store: %s", run_id, exc)
            parts.append(f"run `{run_id}`")
    if lineage.get("finetune.source_path"):
        parts.append(f"`{lineage['finetune.source_path']}`")
    uri = lineage.get("finetune.source_uri")
    given = f" (given as `{uri}`)" if uri and (not model or not uri.startswith(f"models:/{model}/")) else ""
    return f"Fine-tuned from {', '.join(parts) or f'`{uri}`'}{given}."
