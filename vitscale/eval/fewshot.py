"""The paper's few-shot linear probe (Dosovitskiy et al. 2020, section 4.1).

Frozen pre-logit features, a closed-form regularised least-squares map to {-1, 1}^K targets fitted on
k images per class, accuracy on the full test split, averaged over several random draws of the k-shot
subset. Closed form, so a probe costs a feature pass and a small solve, not a training run.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vitscale.eval.topk import ForwardFn

# big_vision's few-shot bias feature: a large constant column makes the bias almost unregularised.
BIAS_FEATURE = 100.0

@torch.no_grad()
def extract_features(
    feature_fn: ForwardFn,
    loader: Iterable[Mapping[str, Any]],
    *,
    max_per_class: int | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F) float32 features and (N,) labels on CPU.

    With `max_per_class` (and `num_classes`) extraction stops once every class has that many, so a
    k-shot pool is drawn from a few thousand images rather than the whole training set.
    """
    feats, labels, seen = [], [], torch.zeros(num_classes or 0, dtype=torch.long)
    for batch in loader:
        y = batch["label"]
        y = (y.argmax(dim=1) if y.ndim == 2 else y).long().cpu()
        keep = torch.ones_like(y, dtype=torch.bool)
        if max_per_class is not None and num_classes:
            if len(y) and int(y.max()) >= len(seen):
                raise ValueError(f"label {int(y.max())} out of range for {len(seen)} classes: pass the "
                                 "dataset's class count (--num-classes)")
            for i, c in enumerate(y.tolist()):
                keep[i] = seen[c] < max_per_class
                seen[c] += int(keep[i])
            if not keep.any():
                if bool((seen >= max_per_class).all()):
                    break
                continue
        feats.append(feature_fn(batch["image"]).float().cpu()[keep])
        labels.append(y[keep])
        if max_per_class is not None and num_classes and bool((seen >= max_per_class).all()):
            break
    if not feats:
        raise ValueError("extract_features: the loader yielded no samples")
    return torch.cat(feats), torch.cat(labels)


def ridge_fit(x: torch.Tensor, targets: torch.Tensor, l2_reg: float) -> torch.Tensor:
    """argmin_W ||xW - targets||^2 + l2_reg ||W||^2, solved in whichever of the primal (D x D) and
    dual (N x N) forms is smaller: k-shot problems have far fewer samples than feature dimensions."""
    n, d = x.shape
    if n >= d:
        return torch.linalg.solve(x.T @ x + l2_reg * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + l2_reg * torch.eye(n, dtype=x.dtype), targets)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, num_classes: int, l2_reg: float = 1.0) -> float:
    """Fit ridge regression to {-1, 1}^K targets on (whitened) train features; test accuracy."""
    mean = train_x.double().mean(dim=0, keepdim=True)
    std = train_x.double().std(dim=0, unbiased=False, keepdim=True) + 1e-5

    def prepare(x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - mean) / std
        return torch.cat([z, torch.full((z.shape[0], 1), BIAS_FEATURE, dtype=z.dtype)], dim=1)

    targets = 2.0 * F.one_hot(train_y.long(), num_classes).double() - 1.0
    weights = ridge_fit(prepare(train_x), targets, l2_reg)
    predictions = (prepare(test_x) @ weights).argmax(dim=1)
    return float((predictions == test_y.long()).double().mean())


def fewshot_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
    shots: Sequence[int] = (1, 5, 10, 25), seeds: Sequence[int] = (0, 1, 2), num_classes: int | None = None,
    l2_reg: float = 1.0,
) -> dict[str, float]:
    """{"{k}shot": mean accuracy over seeds, "{k}shot_std": its spread} for every k in `shots`."""
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    pools = [torch.nonzero(train_y == c).flatten() for c in range(num_classes)]
    out: dict[str, float] = {}
    for k in shots:
        short = [(c, len(p)) for c, p in enumerate(pools) if len(p) < k]
        if short:
            raise ValueError(f"{k}-shot needs {k} training images per class; classes (class, have) {short[:5]} "
                             "have fewer: raise --max-per-class or use other shards")
        accs = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed) * 7919 + int(k))
            idx = torch.cat([p[torch.randperm(len(p), generator=gen)[:k]] for p in pools])
            accs.append(linear_probe_accuracy(train_x[idx], train_y[idx], test_x, test_y, num_classes, l2_reg))
        mean = sum(accs) / len(accs)
        out[f"{k}shot"] = mean
        out[f"{k}shot_std"] = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return out

