"""bnlab: measure and use the optimization effects of normalization in PyTorch."""

__version__ = "0.1.0"
