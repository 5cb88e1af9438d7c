"""The weight-entangled ViT supernet and its elastic layers."""

from hwaware.supernet.supervit import SuperViT

__all__ = ["SuperViT"]
