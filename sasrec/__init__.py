"""SASRec in Keras 3: model, training, evaluation, export and batch recommendation.

Importing this package is cheap; Keras and TensorFlow load when a submodule that needs them is used.
"""

__version__ = "0.1.0"

__all__ = ["Recommendation", "Recommender", "__version__"]

_LAZY = {"Recommender": "sasrec.recommender", "Recommendation": "sasrec.recommender"}


def __getattr__(name: str):
    """``from sasrec import Recommender`` imports :mod:`sasrec.recommender` (not TensorFlow) on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sasrec' has no attribute {name!r}")
