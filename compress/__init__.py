"""compress: prune and quantize small vision models, swept with Hydra."""

__version__ = "0.1.0"
