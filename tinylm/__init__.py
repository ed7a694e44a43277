"""tinylm: from raw text to a trained, evaluated, sampled and exported small language model."""

__version__ = "0.1.0"
