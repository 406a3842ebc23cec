"""Networks: the Attention U-Net and its blocks."""

from seg.models.attention_unet import AttentionUNet
from seg.models.blocks import CBAM, AttentionGate, ChannelAttention, ConvBlock, SpatialAttention

__all__ = ["AttentionUNet", "AttentionGate", "CBAM", "ChannelAttention", "ConvBlock", "SpatialAttention"]
