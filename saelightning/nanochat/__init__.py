"""The project's own implementation of nanochat: model (both eras), checkpoints, tokenizer, shards."""
