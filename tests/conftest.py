"""Shared test set-up: fixtures for tiny real nanochat artefacts, and the gpu marker's skip."""

import os
import tempfile

import pytest
import torch

# Inductor's on-disk cache (its precompiled headers) does not key on ATEN_CPU_CAPABILITY: headers built for
# one kernel choice break a compile under another ("'at::vec' has not been declared"). `make test` runs the
# numerics tests again under another choice, so each choice gets its own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor-saelightning-{os.getuid()}-{os.environ.get('ATEN_CPU_CAPABILITY', 'auto')}"))

# Fixture modules, one per area: tiny tokenizer and parquet shards; tiny nanochat checkpoints.
pytest_plugins = ["tests.fixtures_data", "tests.fixtures_nanochat"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on small ops, OpenMP threads on a shared 2-core machine only wait on each
    other (a module opts in with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
