"""What one conv launch must move and compute: the facts the estimator reads from `ConvLayer.aot_specs`.

Pure arithmetic over a layer's shapes (no launching): useful FLOPs, the least DRAM traffic (every operand
once) and the bytes all programs move through L2 for a given tile config (split-K partials included).
"""

from __future__ import annotations

import math

import torch
import triton


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def flops(layer, input_shape_nhwc) -> int:
    """Useful multiply-add FLOPs (2 per MAC) of the convolution (and a concatenated shortcut), excluding
    super-group padding."""
    n, oh, ow, c_out = layer.output_shape(input_shape_nhwc)
    r, s = layer.kernel_size
    return 2 * n * oh * ow * c_out * (r * s * (layer.in_channels // layer.groups) + layer.shortcut_channels)


def _shortcut_pixels(layer, input_shape_nhwc) -> int:
    """Pixels of the shortcut input the K-concatenated GEMM reads (one per output pixel, 2x2 pooled: four)."""
    if not layer.shortcut_channels:
        return 0
    n, oh, ow, _ = layer.output_shape(input_shape_nhwc)
    return n * oh * ow * (4 if layer.avg_pool else 1)


def min_bytes(layer, input_shape_nhwc) -> int:
    """Input, shortcut input, packed weights, bias, residual and output, each once: the least DRAM traffic."""
    n, h, w, c = input_shape_nhwc
    out = math.prod(layer.output_shape(input_shape_nhwc))
    bias = 0 if layer.bias is None else 4 * layer.out_channels
    shortcut = _shortcut_pixels(layer, input_shape_nhwc) * layer.shortcut_channels
    acts = n * h * w * c + shortcut + out * (2 if layer.has_residual else 1)
    return _elem(layer.dtype) * (acts + layer.weight_packed.numel()) + bias


def l2_bytes(layer, input_shape_nhwc, config) -> int:
    """Bytes all programs load and store: each A row once per output-channel tile of its group, the packed
    weights once per pixel tile, the output (and residual) once, plus split-K's fp32 partials written and
    read back once each. Masked lanes move nothing."""
    elem = _elem(layer.dtype)
    n, oh, ow, c_out = layer.output_shape(input_shape_nhwc)
    m = n * oh * ow
    m_tiles = triton.cdiv(m, config.block_m)
    n_tiles = triton.cdiv(layer.kernel_ng, config.block_n)
    k = layer.weight_packed.shape[0] - layer.shortcut_channels  # R*S*CG per (super-)group
    own_pool = 4 if layer.avg_pool and not layer.shortcut_channels else 1  # a pooled 1x1 reads 2x2 per pixel
    a = m * k * layer.kernel_groups * own_pool
    a += _shortcut_pixels(layer, input_shape_nhwc) * layer.shortcut_channels
    a *= n_tiles
    bias = 0 if layer.bias is None else 4 * c_out * m_tiles
    partials = 2 * 4 * m * c_out * config.split_k if config.split_k > 1 else 0
    outputs = m * c_out * (2 if layer.has_residual else 1)
    return elem * (a + layer.weight_packed.numel() * m_tiles + outputs) + bias + partials
