"""Figure 7 numbers against known answers, and that every figure renders to a logged PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vitscale.eval.figures import (
    attention_distance_by_depth, log_run_figures, mean_attention_distance, patch_embedding_components,
    position_embedding_similarity, read_metrics,
)


def _brute_mean_distance(gh: int, gw: int, spacing: float) -> float:
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    total = sum(math.dist(a, b) for a in cells for b in cells)
    return spacing * total / len(cells) ** 2


def test_uniform_attention_gives_the_analytic_mean_distance():
    gh, gw, prefix, heads = 3, 4, 1, 2
    tokens = gh * gw + prefix
    uniform = torch.full((2, heads, tokens, tokens), 1.0 / tokens)  # includes the class token: renormalised
    got = mean_attention_distance(uniform, (gh, gw), prefix, spacing=(7.0, 7.0))
    assert got.shape == (heads,)
    assert torch.allclose(got, torch.full((heads,), _brute_mean_distance(gh, gw, 7.0), dtype=torch.float64))


def test_self_attention_is_zero_and_right_neighbour_is_one_patch():
    gh, gw, prefix = 3, 4, 1
    tokens = gh * gw + prefix
    self_only = torch.eye(tokens).expand(1, 3, tokens, tokens)
    assert torch.allclose(mean_attention_distance(self_only, (gh, gw), prefix, (7.0, 7.0)), torch.zeros(3).double())
    right = torch.zeros(1, 1, tokens, tokens)
    for q in range(gh * gw):
        target = q + 1 if (q % gw) < gw - 1 else q - 1  # last column looks left: also one patch away
        right[0, 0, prefix + q, prefix + target] = 1.0
    assert mean_attention_distance(right, (gh, gw), prefix, (5.0, 7.0)).item() == pytest.approx(7.0)
    with pytest.raises(ValueError, match="does not match a 3x4 grid"):
        mean_attention_distance(torch.ones(1, 1, 5, 5), (gh, gw), prefix)


def test_patch_embedding_components_recover_the_dominant_filter():
    gen = torch.Generator().manual_seed(0)
    a = torch.zeros(3, 4, 4)
    a[0, :2] = 1.0  # red top half
    b = torch.zeros(3, 4, 4)
    b[2, :, :2] = 1.0  # blue left half
    coeff = torch.randn(64, 2, generator=gen) * torch.tensor([10.0, 1.0])  # `a` varies 10x more than `b`
    weight = coeff[:, :1, None, None] * a + coeff[:, 1:, None, None] * b + 5.0  # a constant offset is centred away
    comps = patch_embedding_components(weight.reshape(64, 3, 4, 4), count=28)
    assert comps.shape[1:] == (3, 4, 4) and comps.shape[0] <= 28
    first = comps[0].flatten()
    assert abs(torch.dot(first, (a / a.norm()).flatten().double()).item()) == pytest.approx(1.0, abs=1e-3)


def test_position_similarity_is_cosine_on_the_grid():
    gh, gw, dim = 2, 3, 6
    pos = torch.cat([torch.randn(1, 1, dim), torch.eye(dim)[None]], dim=1)  # class token, then orthogonal rows
    sim = position_embedding_similarity(pos, (gh, gw), 1)
    assert sim.shape == (gh, gw, gh, gw)
    assert torch.allclose(sim.reshape(6, 6), torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        position_embedding_similarity(pos, (3, 3), 1)


class _RecordingTracker:
    """Stands in for MlflowTracker.log_figure (whose upload is tested in test_tracking.py)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.logged: dict[str, Path] = {}

    def log_figure(self, fig, name: str) -> Path:
        path = self.out / f"{name}.png"
        fig.savefig(path)
        self.logged[name] = path
        return path


def test_run_figures_render_and_are_logged(tmp_path):
    from vitscale.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=28, patch_size=7, in_chans=3, num_classes=5, embed_dim=48,
                         depth=3, num_heads=3)
    images = torch.randn(2, 3, 28, 28)
    distances = attention_distance_by_depth(model, images)
    max_distance = math.dist((0, 0), (21, 21))
    assert distances.shape == (3, 3) and bool(((distances > 0) & (distances < max_distance)).all())

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 2.3, "lr": 1e-4}, {"step": 2, "loss": 1.9, "lr": 2e-4, "eval/top1": 0.4},
        {"step": 3, "loss": 1.5, "lr": 1e-4, "eval/top1": 0.6, "eval/loss": 1.2}]) + "\n")
    tracker = _RecordingTracker(tmp_path)
    names = log_run_figures(tracker, model=model, images=images, metrics_path=metrics)
    assert set(names) == {"training_curves", "patch_embedding_pcs", "position_embedding_similarity",
                          "attention_distance"}
    for path in tracker.logged.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000

    from safetensors.torch import save_file

    from vitscale.eval.figures import log_export_figures

    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
    (export / "model_config.json").write_text(json.dumps(model.config))
    assert set(log_export_figures(_RecordingTracker(tmp_path), export, images=images)) == {
        "patch_embedding_pcs", "position_embedding_similarity", "attention_distance"}


def test_read_metrics_names_the_bad_line(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(bad)


def test_cli_draws_from_an_export_and_logs_to_a_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from safetensors.torch import save_file

    from vitscale.figures import main
    from vitscale.models import create_model

    model = create_model("vit_ti16", img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32,
                         depth=2, num_heads=2)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
    (export / "model_config.json").write_text(json.dumps(model.config))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("fig", (tmp_path / "art").as_uri())).info.run_id
    written = main(["--weights", str(export), "--metrics", str(metrics), "--out", str(tmp_path / "figs"),
                    "--run-id", run_id])
    assert {p.name for p in written} == {"training_curves.png", "patch_embedding_pcs.png",
                                         "position_embedding_similarity.png"}  # no --shards: no attention
    assert {f.path for f in client.list_artifacts(run_id, "figures")} == {f"figures/{p.name}" for p in written}


def test_position_embedding_ticks_sit_on_cell_centres():
    """imshow centres pixel k at k: a block of `cells` pixels starting at s is centred at s + (cells - 1) / 2."""
    import numpy as np

    from vitscale.eval.figures import mosaic_tick_positions, plot_position_embedding_similarity

    assert mosaic_tick_positions(3) == [1.0, 5.0, 9.0]
    assert mosaic_tick_positions(2) == [0.5, 3.5]
    gh, gw = 2, 3
    fig = plot_position_embedding_similarity(torch.randn(1, 1 + gh * gw, 8), (gh, gw), 1)
    ax = fig.axes[0]
    mosaic = np.ma.filled(np.ma.asarray(ax.images[0].get_array(), dtype=float), np.nan)
    for ticks, cells, line in ((ax.get_xticks(), gw, mosaic[0]), (ax.get_yticks(), gh, mosaic[:, 0])):
        assert list(ticks) == mosaic_tick_positions(cells)
        for centre in ticks:  # the block around each tick is all data, the pixels just outside are the gaps
            lo, hi = int(centre - (cells - 1) / 2), int(centre + (cells - 1) / 2)
            assert not np.isnan(line[lo:hi + 1]).any()
            assert lo == 0 or np.isnan(line[lo - 1])
            assert hi + 1 == len(line) or np.isnan(line[hi + 1])
