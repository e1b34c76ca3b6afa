"""`ConvLayer.aot_specs`: what a conv layer's launch compiles for one input shape, without launching it."""

from __future__ import annotations

import torch

from .aot import KernelSpec, ShapeOnly, make_spec
from .conv_configs import ConvConfig, fused_reduce_trips, steps_per_split
from .conv_cost import flops, l2_bytes, min_bytes
from .conv_kernel import _conv_kernel
from .launch import pointers_for_placeholders
from .pdl import pdl_for_arch, prefetch_bytes
from .splitk import reduce_spec


def conv_aot_specs(layer, input_shape_nhwc, arch: int, config: ConvConfig | None = None) -> list[KernelSpec]:
    """What `__call__` compiles for this input shape on compute capability `arch`, without launching:
    the conv kernel, and the split-K reduce kernel when the config splits K."""
    shape = tuple(input_shape_nhwc)
    config = config or layer.config_for(shape, arch)
    out_shape = layer.output_shape(shape)
    x = ShapeOnly(shape, layer.dtype)
    out = ShapeOnly(out_shape, layer.out_dtype)
    residual = ShapeOnly(out_shape, layer.dtype) if layer.has_residual else None
    x2 = None
    if layer.shortcut_channels:
        s2 = layer.shortcut_stride
        x2 = ShapeOnly(
            (shape[0], out_shape[1] * s2, out_shape[2] * s2, layer.shortcut_channels), layer.dtype
        )
    ws = (None, None)
    if config.split_k > 1:
        ws = (ShapeOnly((config.split_k, 0, 0), layer.acc_dtype), ShapeOnly((0,), torch.int32))
    args, constexprs, grid = layer._kernel_args(x, residual, out, config, x2, ws)
    args = pointers_for_placeholders(args)
    constexprs["USE_PDL"] = pdl = pdl_for_arch(arch)
    weight_bytes = layer.weight_packed.element_size()
    r, s = layer.kernel_size
    dil = f"_d{layer.dilation}" if layer.dilation > 1 else ""
    name = (
        f"conv{r}x{s}_s{layer.stride}{dil}_{layer.in_channels}to{layer.out_channels}_g{layer.groups}"
        f"{f'_sc{layer.shortcut_channels}s{layer.shortcut_stride}' if layer.shortcut_channels else ''}"
        f"{'_avg2x2' if layer.avg_pool else ''}"
        f"_{'x'.join(map(str, shape))}_{str(layer.dtype).replace('torch.', '')}"
    )
    specs = [
        make_spec(
            _conv_kernel,
            args,
            constexprs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            maxnreg=config.maxnreg,
            name=name,
            config=str(config),
            grid=grid,
            k_steps=steps_per_split(layer.total_k_steps(config.block_k), config.split_k),
            flops=flops(layer, shape),
            min_bytes=min_bytes(layer, shape),
            l2_bytes=l2_bytes(layer, shape, config),
            reduce_trips=fused_reduce_trips(config, layer.dtype == torch.float32),
            prefetch_bytes=prefetch_bytes(
                constexprs["PREFETCH_STEPS"] * config.block_k, config.block_n, weight_bytes
            ),
        )
    ]
    if config.split_k > 1 and not config.fused_reduce:
        specs.append(
            reduce_spec(
                layer.dtype,
                has_bias=layer.bias is not None,
                has_residual=layer.has_residual,
                m=out_shape[0] * out_shape[1] * out_shape[2],
                c_out=layer.out_channels,
                split=config.split_k,
                relu=layer.relu,
                name=f"{name}_splitk_reduce",
                pdl=pdl,
            )  # fmt: skip
        )
    return specs

