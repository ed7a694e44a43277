"""Data: sources -> prepared token shards -> batches.

The entry point for training is `resolve_data(cfg.data, tokenizer, context_length)` (in
`resolve.py`): the tokenizer and the token arrays a run reads. The other modules: `sources.py`
(documents from files and hubs), `registry.py` (named datasets), `prepare.py` (tokenizing into
shards), `shards.py` (the on-disk format), `loader.py` (batches). See docs/DESIGN.md.
"""

from __future__ import annotations

from tinylm.data.errors import DataError
from tinylm.data.resolve import (
    ResolvedData,
    fitted_tokenizer,
    resolve_data,
    source_name,
    train_bpe_on_sources,
)
from tinylm.data.shards import PreparedDataset, TokenArray

__all__ = [
    "DataError",
    "PreparedDataset",
    "ResolvedData",
    "TokenArray",
    "fitted_tokenizer",
    "resolve_data",
    "source_name",
    "train_bpe_on_sources",
]
