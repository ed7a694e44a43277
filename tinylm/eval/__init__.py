"""Evaluation: loss, perplexity and bits per byte on held-out tokens."""
