"""Data: sources -> prepared token shards -> batches (see docs/DESIGN.md)."""
