"""Networks: the Attention U-Net and its blocks.

The names are loaded on first use, so `seg.models.topology` (the stride rule `seg plan` uses) imports no MONAI.
"""

import importlib

_WHERE = {"NETWORK_DEFAULTS": "attention_unet", "AttentionUNet": "attention_unet", "AttentionGate": "blocks",
          "CBAM": "blocks", "ChannelAttention": "blocks", "ConvBlock": "blocks", "SpatialAttention": "blocks"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'seg.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"seg.models.{_WHERE[name]}"), name)
