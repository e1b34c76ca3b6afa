"""Triton kernels for fastres (imported as fastres.kernels). A leaf: imports torch and triton only."""

from .aot import KernelSpec, KernelStats, compile_spec
from .conv import CONV_CONFIGS, ConvConfig, ConvLayer, conv_out_shape
from .head import HeadLayer, global_avg_pool_nhwc
from .pool import max_pool2d_nhwc, max_pool_aot_specs, pool_output_shape
from .stem import STEM_CONFIGS, StemConfig, StemLayer

__all__ = [
    "CONV_CONFIGS",
    "ConvConfig",
    "ConvLayer",
    "HeadLayer",
    "KernelSpec",
    "KernelStats",
    "STEM_CONFIGS",
    "StemConfig",
    "StemLayer",
    "compile_spec",
    "conv_out_shape",
    "global_avg_pool_nhwc",
    "max_pool2d_nhwc",
    "max_pool_aot_specs",
    "pool_output_shape",
]
