"""saelightning: sparse autoencoders on frozen nanochat models, trained with PyTorch Lightning."""

import importlib

__version__ = "0.1.0"
__all__ = ["load_nanochat", "load_sae", "InterpretableModel", "SAELightningError", "write_activations"]

# Imported on first use so that `import saelightning` (and the CLI's --help) stays cheap.
_LAZY = {
    "load_nanochat": "saelightning.nanochat.checkpoint",
    "load_sae": "saelightning.export",
    "InterpretableModel": "saelightning.runtime",
    "SAELightningError": "saelightning.errors",
    "write_activations": "saelightning.activations",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saelightning' has no attribute {name!r}")
