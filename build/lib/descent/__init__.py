"""descent: study how neural networks are optimized, on images (PyTorch Lightning + Hydra)."""

__version__ = "0.1.0"
