"""Pictures of a run: training curves, and the paper's Figure 7 panels for a trained ViT.

Figure 7 (Dosovitskiy et al. 2020) shows what a ViT learned: (left) the first principal components of
the patch-embedding filters, (centre) the cosine similarity of each position embedding with every
other, laid out on the patch grid, (right) the mean attention distance of every head against depth,
the ViT analogue of a CNN's receptive field. Numbers are computed by small pure functions (tested);
plotting only draws them.

Importing this module changes no global matplotlib state: every figure is created with its own Agg
canvas inside the drawing function (``_figure``), so the Trainer, a notebook with an interactive
backend and a headless CLI can all use it; pyplot is never involved, so nothing needs closing.
The CLI is ``python -m vitscale.figures``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs: Any) -> Figure:
    """A figure drawn by the Agg backend, chosen here per figure rather than process-wide at import."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------------------------ numbers
def patch_grid_coordinates(grid_size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """(gh * gw, 2) pixel centres of the patches, row-major like the token order."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    return torch.stack([rows.flatten() * spacing[0], cols.flatten() * spacing[1]], dim=1)


def mean_attention_distance(attn: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int,
                            spacing: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """(H,) attention-weighted mean distance between query and key patches, averaged over queries and
    the batch, in the units of `spacing` (pixels per patch row/column).

    Prefix tokens (class token) have no position: they are dropped as queries and keys, and each
    query's weights over the remaining patches are renormalised to sum to one.
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be (B, H, T, T), got {tuple(attn.shape)}")
    n = grid_size[0] * grid_size[1]
    if attn.shape[-1] != n + num_prefix_tokens:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not match a {grid_size[0]}x{grid_size[1]} "
                         f"grid plus {num_prefix_tokens} prefix tokens")
    patches = attn[..., num_prefix_tokens:, num_prefix_tokens:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    coords = patch_grid_coordinates(grid_size, spacing)
    distances = torch.cdist(coords, coords)  # (N, N)
    per_query = (patches * distances).sum(dim=-1)  # (B, H, N)
    return per_query.mean(dim=(0, 2))


@torch.no_grad()
def attention_distance_by_depth(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(depth, heads) mean attention distance in pixels for a batch of images."""
    maps = model.attention_maps(images)
    gh, gw = model.grid_size
    spacing = (images.shape[-2] / gh, images.shape[-1] / gw)
    return torch.stack([mean_attention_distance(a, (gh, gw), model.num_prefix_tokens, spacing) for a in maps])


def patch_embedding_components(weight: torch.Tensor, count: int = 28) -> torch.Tensor:
    """(min(count, rank), C, p, p) leading principal components of the (D, C, p, p) embedding filters."""
    if weight.ndim != 4:
        raise ValueError(f"patch-embedding weight must be (D, C, p, p), got {tuple(weight.shape)}")
    d, c, ph, pw = weight.shape
    flat = weight.detach().double().reshape(d, -1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    return vh[:count].reshape(-1, c, ph, pw)


def position_embedding_similarity(pos_embed: torch.Tensor, grid_size: Sequence[int],
                                  num_prefix_tokens: int) -> torch.Tensor:
    """(gh, gw, gh, gw): [i, j] is the cosine similarity of patch (i, j)'s embedding to every patch."""
    gh, gw = grid_size
    pos = pos_embed.detach().double().reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:]
    if pos.shape[0] != gh * gw:
        raise ValueError(f"{pos.shape[0]} position embeddings do not fill a {gh}x{gw} grid")
    unit = F.normalize(pos, dim=1)
    return (unit @ unit.T).reshape(gh, gw, gh, gw)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a malformed line is an error naming the file and line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number}: expected an object with a 'step' key")
        records.append(record)
    return records


# ------------------------------------------------------------------------------------------ drawing
def _unit_range(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def plot_patch_embedding_components(weight: torch.Tensor, count: int = 28) -> Figure:
    comps = patch_embedding_components(weight, count)
    cols = min(7, len(comps))
    rows = math.ceil(len(comps) / cols)
    fig = _figure(figsize=(1.2 * cols, 1.2 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, comp in zip(axes.flat, comps):
        img = _unit_range(comp)
        if img.shape[0] == 3:
            ax.imshow(img.permute(1, 2, 0).numpy())
        else:
            ax.imshow(img.mean(dim=0).numpy(), cmap="gray")
    fig.suptitle(f"Patch-embedding filters: first {len(comps)} principal components")
    return fig


def mosaic_tick_positions(cells: int) -> list[float]:
    """Centre of each cell-sized block in the similarity mosaic along one axis (blocks of `cells`
    pixels, one NaN pixel between them). imshow puts pixel k's centre at k, so a block starting at s
    is centred at s + (cells - 1) / 2, not s + cells / 2 (which is half a pixel off)."""
    return [j * (cells + 1) + (cells - 1) / 2 for j in range(cells)]


def plot_position_embedding_similarity(pos_embed: torch.Tensor, grid_size: Sequence[int],
                                       num_prefix_tokens: int) -> Figure:
    """One small map per patch, laid out on the grid as in the paper; drawn as a single mosaic image
    so a 24x24 grid costs one imshow, not 576 axes."""
    sim = position_embedding_similarity(pos_embed, grid_size, num_prefix_tokens)
    gh, gw = grid_size
    mosaic = torch.full((gh * (gh + 1), gw * (gw + 1)), float("nan"), dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            mosaic[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = sim[i, j]
    fig = _figure(figsize=(6, 6 * gh / gw + 0.5))
    ax = fig.subplots()
    image = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_xticks(mosaic_tick_positions(gw), [str(j + 1) for j in range(gw)], fontsize=6)
    ax.set_yticks(mosaic_tick_positions(gh), [str(i + 1) for i in range(gh)], fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    ax.set_title("Position embedding similarity")
    return fig


def plot_attention_distance(distances: torch.Tensor, image_size: float | None = None) -> Figure:
    from matplotlib.ticker import MaxNLocator

    depth, heads = distances.shape
    fig = _figure(figsize=(5, 4))
    ax = fig.subplots()
    for h in range(heads):
        ax.scatter(range(1, depth + 1), distances[:, h].numpy(), s=12, label=f"head {h + 1}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    if image_size:
        ax.set_ylim(0, image_size)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title("Mean attention distance per head")
    return fig


def plot_training_curves(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss, accuracy (top-k, few-shot) and learning-rate panels from metrics.jsonl records."""
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    panels = {
        "loss": [k for k in keys if k.endswith("loss")],
        "accuracy": [k for k in keys if "top" in k or "acc" in k or "shot" in k],
        "learning rate": [k for k in keys if k in ("lr", "learning_rate")],
    }
    panels = {title: ks for title, ks in panels.items() if ks}
    if not panels:
        raise ValueError("no loss, accuracy or learning-rate metrics to plot")
    fig = _figure(figsize=(4.5 * len(panels), 3.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels.items()):
        for key in ks:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                    label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ bundles
def model_figures(model: torch.nn.Module, images: torch.Tensor | None = None) -> dict[str, Figure]:
    """The Figure 7 panels that apply: filter PCs only when the embedding sees pixels (a hybrid's
    projection sees ResNet features), attention distance only when images are given."""
    figures: dict[str, Figure] = {}
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, torch.nn.Conv2d) and proj.in_channels in (1, 3):
        figures["patch_embedding_pcs"] = plot_patch_embedding_components(proj.weight)
    figures["position_embedding_similarity"] = plot_position_embedding_similarity(
        model.pos_embed, model.grid_size, model.num_prefix_tokens)
    if images is None:
        return figures
    was_training = model.training
    model.eval()
    try:
        distances = attention_distance_by_depth(model, images)
    finally:
        model.train(was_training)
    figures["attention_distance"] = plot_attention_distance(distances.cpu(), image_size=float(images.shape[-1]))
    return figures


def log_run_figures(tracker: Any, *, model: torch.nn.Module | None = None, images: torch.Tensor | None = None,
                    metrics_path: str | Path | None = None) -> list[str]:
    """Draw whatever the inputs allow, log each PNG through `tracker.log_figure`, close the figures.

    Returns the names drawn. Rank 0 only in practice (other ranks' NullTracker ignores them).
    """
    figures: dict[str, Figure] = {}
    if metrics_path is not None and Path(metrics_path).is_file():
        figures["training_curves"] = plot_training_curves(read_metrics(metrics_path))
    if model is not None:
        figures |= model_figures(model, images)
    for name, fig in figures.items():
        tracker.log_figure(fig, name)
    return list(figures)


def log_export_figures(tracker: Any, export_dir: str | Path, *, images: torch.Tensor | None = None,
                       metrics_path: str | Path | None = None) -> list[str]:
    """`log_run_figures` for a consolidated export: rank 0 rebuilds the model on CPU from the export, so
    this works after ZeRO-3 training too (whose live parameters are partitioned across ranks)."""
    from vitscale.eval.weights import load_model

    model, _, _ = load_model(Path(export_dir), torch.device("cpu"))
    return log_run_figures(tracker, model=model, images=None if images is None else images.float().cpu(),
                           metrics_path=metrics_path)


def first_images(shards: str, config: Mapping[str, Any], export_dir: str | Path, count: int) -> torch.Tensor:
    """The first `count` evaluation images of `shards`, preprocessed as the export was trained (mean,
    std, crop and the sample keys, so bring-your-own shards with other member names work too)."""
    from vitscale.data import build_eval_loader
    from vitscale.eval.weights import training_preprocessing

    in_chans = int(config["in_chans"])
    prep = training_preprocessing(export_dir, in_chans)
    loader = build_eval_loader(shards, batch_size=count, rank=0, world_size=1, img_size=config["img_size"],
                               in_chans=in_chans, num_workers=0, mean=prep.mean, std=prep.std,
                               crop_pct=prep.crop_pct, image_key=prep.image_key, label_key=prep.label_key)
    for batch in loader:
        return batch["image"]
    raise ValueError(f"shards {shards!r} yielded no images")
