"""hwaware: hardware-aware search and deployment of weight-entangled Vision Transformers."""

__version__ = "0.1.0"


def load_model(path):
    """The timm `VisionTransformer` of an `hwaware export` folder, weights loaded (see hwaware.export.load_model)."""
    from hwaware.export import load_model as _load_model

    return _load_model(path)
