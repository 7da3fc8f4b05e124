"""Fixtures: a tiny tokenizer trained with rustbpe and a few parquet shards (filled in by the data work)."""
