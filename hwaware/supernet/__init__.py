"""The weight-entangled ViT supernet and its elastic layers."""

from hwaware.supernet.vit import SuperViT

__all__ = ["SuperViT"]
