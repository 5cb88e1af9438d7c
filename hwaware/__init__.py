"""hwaware: hardware-aware search and deployment of weight-entangled Vision Transformers."""

__version__ = "0.1.0"
