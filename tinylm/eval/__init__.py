"""Evaluation: loss, perplexity and bits per byte on held-out tokens."""

from tinylm.eval.evaluate import (
    EvalResult,
    EvalSetsResult,
    evaluate,
    evaluate_full,
    evaluate_sets,
)

__all__ = ["EvalResult", "EvalSetsResult", "evaluate", "evaluate_full", "evaluate_sets"]
