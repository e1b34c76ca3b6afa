"""`StemLayer.aot_specs`: what the stem's launch compiles for one input shape, without launching."""

from __future__ import annotations

import math

import torch
import triton

from .aot import KernelSpec, ShapeOnly, make_spec
from .launch import pointers_for_placeholders
from .pdl import pdl_for_arch, prefetch_bytes


def stem_aot_specs(
    layer, kernel, input_shape_nchw, arch: int, input_dtype=None, config=None
) -> list[KernelSpec]:
    """The spec of `layer`'s launch of `kernel` (a `StemLayer` and its `_stem_kernel`, passed in: this
    module is imported by kernels/stem.py) for this logical NCHW input shape on `arch`."""
    shape = tuple(input_shape_nchw)
    input_dtype = input_dtype or layer.dtype
    config = config or layer.config_for(arch)
    out_shape = layer.output_shape(shape)
    n, c, h, w = shape
    elem = torch.empty((), dtype=layer.dtype).element_size()
    x = ShapeOnly(shape, input_dtype)
    out = ShapeOnly(out_shape, layer.dtype)
    nchw_strides = (c * h * w, h * w, w, 1)
    args, constexprs, grid = layer._kernel_args(x, nchw_strides, out, config, pdl_for_arch(arch))
    args = pointers_for_placeholders(args)
    r, s = layer.kernel_size
    pad = "_padval" if layer.pad_value is not None else ""
    name = (
        f"stem{r}x{s}_s{layer.stride}_{layer.in_channels}to{layer.out_channels}_{'x'.join(map(str, shape))}"
        f"_{str(input_dtype).replace('torch.', '')}to{str(layer.dtype).replace('torch.', '')}{pad}"
    )
    spec = make_spec(
        kernel, args, constexprs, name=name, **config.spec_options(),
        # Launch facts for the estimator: one K-step per ROWS_PER_STEP filter rows; the input, the
        # packed weights and the output once each.
        grid=grid,
        k_steps=triton.cdiv(r, config.rows_per_step),
        flops=2 * math.prod(out_shape) * r * s * c,
        min_bytes=(
            math.prod(shape) * torch.empty((), dtype=input_dtype).element_size()
            + (layer.packed_weight(config.rows_per_step).numel() + math.prod(out_shape))
            * elem
        ),
        prefetch_bytes=prefetch_bytes(
            constexprs["PREFETCH_STEPS"] * constexprs["BLOCK_K"], config.block_n, elem
        ),
    )
    return [spec]
