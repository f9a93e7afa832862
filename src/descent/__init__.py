"""descent: study how neural networks are optimized, on images (PyTorch Lightning + Hydra)."""

from pathlib import Path

__version__ = "0.1.0"

CONF_DIR = Path(__file__).parent / "conf"  # the Hydra configs, shipped in the package (wheel included)
