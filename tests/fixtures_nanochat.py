"""Fixtures: tiny nanochat checkpoints of both eras in nanochat's own format (filled in by the model work)."""
