"""spartan: sparse attention post-training, density measurement and circuit discovery.

Importing this package is cheap (no torch); the public functions import what they need.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "sparsify"]


def load(path, **kwargs):
    """Load a spartan checkpoint directory -> (gated model, tokenizer). See checkpoint.load."""
    from spartan_cli.checkpoint import load as _load

    return _load(path, **kwargs)


def sparsify(model, data, cfg, **kwargs):
    """Post-train ``model`` to sparse attention. See train.sparsify."""
    from spartan_cli.train import sparsify as _sparsify

    return _sparsify(model, data, cfg, **kwargs)
