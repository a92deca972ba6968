"""Evaluation as a library: exact top-k across ranks, the few-shot linear probe, loading an export to
evaluate, and (in ``vitscale.eval.figures``, not imported here so that evaluation never pays for
matplotlib) the run's figures.

The engine and the CLIs (``python -m vitscale.evaluate``, ``python -m vitscale.figures``) both build on
this package; it imports neither of them.
"""
from vitscale.eval.fewshot import (
    BIAS_FEATURE, extract_features, fewshot_accuracy, linear_probe_accuracy, ridge_fit,
)
from vitscale.eval.topk import ForwardFn, evaluate_topk
from vitscale.eval.weights import EvalPreprocessing, load_model, manifest_num_classes, training_preprocessing

__all__ = [
    "BIAS_FEATURE", "EvalPreprocessing", "ForwardFn", "evaluate_topk", "extract_features", "fewshot_accuracy",
    "linear_probe_accuracy", "load_model", "manifest_num_classes", "ridge_fit", "training_preprocessing",
]
