"""Shared test set-up: fixtures for tiny real nanochat artefacts, and the gpu marker's skip."""

import pytest
import torch

# Fixture modules, one per area: tiny tokenizer and parquet shards; tiny nanochat checkpoints.
pytest_plugins = ["tests.fixtures_data", "tests.fixtures_nanochat"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
