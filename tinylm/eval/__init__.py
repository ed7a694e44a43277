"""Evaluation: loss, perplexity and bits per byte on held-out tokens."""

from tinylm.eval.evaluate import (
    OVERALL,
    EvalResult,
    evaluate,
    evaluate_full,
    evaluate_sets,
)

__all__ = ["OVERALL", "EvalResult", "evaluate", "evaluate_full", "evaluate_sets"]
