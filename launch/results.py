"""The sweep's results: one row per trial (CSV) and a metric-vs-hyper-parameter figure (PNG).

Built from Tune's ResultGrid, which knows every trial's sampled parameters, last metrics and error;
an ASHA-stopped trial ends TERMINATED like a finished one, so "stopped early" is derived here from
its last step versus the step budget.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from launch.spec import SweepSpec

CONFIG_PREFIX = "config/"


def results_table(result_grid: Any, spec: SweepSpec, max_steps: int) -> Any:
    """pandas DataFrame: trial_id, status, stopped_early, each swept key, the metric, step, ..."""
    import pandas as pd

    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(str(result.path))
        step = metrics.get("step")
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "status": "ERROR" if result.error is not None else "TERMINATED",
            "stopped_early": bool(result.error is None and step is not None and step < max_steps),
            **{key: (result.config or {}).get(key) for key in spec.search_space},
            spec.metric: metrics.get(spec.metric),
            "step": step,
            "resumed_from_step": metrics.get("resumed_from_step"),
            "training_iteration": metrics.get("training_iteration"),
            "time_total_s": metrics.get("time_total_s"),
            "checkpoint_path": last_checkpoint_path(result),
            "error": None if result.error is None else str(result.error).splitlines()[0][:300],
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        ascending = spec.mode == "min"
        frame = frame.sort_values(spec.metric, ascending=ascending, na_position="last").reset_index(drop=True)
    return frame


def _trial_id_from_path(path: str) -> str:
    """A trial that failed before its first report has no metrics; its directory name
    (`run_trial_<experiment>_<index>_...`) still carries the id."""
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name)
    return match.group(1) if match else Path(path).name


def last_checkpoint_path(result: Any) -> str | None:
    """The trial's newest reported checkpoint (its last report may have carried none)."""
    history = getattr(result, "metrics_dataframe", None)
    if history is not None and "checkpoint_path" in history:
        paths = history["checkpoint_path"].dropna()
        if len(paths):
            return str(paths.iloc[-1])
    path = (result.metrics or {}).get("checkpoint_path")
    return str(path) if path else None


def best_row(frame: Any, spec: SweepSpec) -> Any | None:
    """The best trial with a checkpoint (a crashed trial cannot be registered)."""
    usable = frame[frame["checkpoint_path"].notna() & frame[spec.metric].notna()]
    return None if usable.empty else usable.iloc[0]


def plot_results(frame: Any, spec: SweepSpec) -> Any:
    """One scatter per swept key: metric against its value; hollow markers for stopped trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.search_space)
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        domain = spec.search_space[key]
        for stopped, marker_face in ((False, "C0"), (True, "none")):
            part = frame[(frame["stopped_early"] == stopped) & frame[spec.metric].notna()]
            if part.empty:
                continue
            xs = part[key].tolist()
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            ax.scatter(xs if numeric else [str(x) for x in xs], part[spec.metric], facecolors=marker_face,
                       edgecolors="C0", s=40, label="stopped early (ASHA)" if stopped else "ran to the end")
        values = [v for v in frame[key].tolist() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if domain.kind == "loguniform" or (values and min(values) > 0 and max(values) / min(values) >= 100):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"sweep {spec.name}: {spec.metric} ({spec.mode}) per trial")
    fig.tight_layout()
    return fig


def write_results(frame: Any, spec: SweepSpec, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "sweep_results.csv"
    frame.to_csv(csv, index=False)
    fig = plot_results(frame, spec)
    png = out_dir / "sweep_results.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return csv, png
