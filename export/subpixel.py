"""The RGB conv moved in front of the last PixelShuffle, re-exported from ``rdn.subpixel`` where
it now lives (``rdn.from_onnx`` inverts it). Kept because ``tests/bench`` imports this path."""

from rdn.subpixel import KERNEL, fold_rgb_before_shuffle, hr_conv_weights, subpixel_conv_weights

__all__ = ["KERNEL", "fold_rgb_before_shuffle", "hr_conv_weights", "subpixel_conv_weights"]
