"""tune-inat: find the best fine-tuning recipe for a torchvision backbone on an image-folder dataset.

The data flows one way, one module per step:
data -> models -> engine (plain PyTorch) -> trainable -> search (Ray Tune) -> results -> analyze.
Importing this package is cheap on purpose: it imports neither torch nor Ray.
"""

__version__ = "0.1.0"
