"""tune-inat: find the best fine-tuning recipe for a torchvision backbone on an image-folder dataset.

The data flows one way, one module per step:
data -> models -> engine (plain PyTorch) -> trainable -> search (Ray Tune) -> results -> analyze.
Importing this package is cheap on purpose: it imports neither torch nor Ray. From Python,
`tune_inat.search(...)`, `tune_inat.train(...)`, `tune_inat.final(...)` and `tune_inat.predict(...)` are the
commands (see `api.py`).
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["final", "predict", "search", "train", "UserError"]

_COMMANDS = ("search", "train", "final", "predict")  # each module is callable: tune_inat.search(...) runs a search


def __getattr__(name: str) -> Any:
    """`tune_inat.search(...)`, `tune_inat.train(...)`, `tune_inat.final(...)`, `tune_inat.predict(...)`: imported
    on first use."""
    if name in _COMMANDS:
        return importlib.import_module(f"tune_inat.{name}")
    if name == "UserError":
        from tune_inat.errors import UserError

        return UserError
    raise AttributeError(f"module 'tune_inat' has no attribute {name!r}")
