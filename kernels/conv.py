"""`ConvLayer`: a convolution's weights packed once, its launches (conv kernel, split-K reduce) and AOT specs.

The kernel and its GEMM view are in kernels/conv_kernel.py; the config table and the rules that pick a
config and a split-K factor per shape are in kernels/conv_configs.py; the split-K reduction is in
kernels/splitk.py.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton

from .aot import KernelSpec
from .conv_aot import conv_aot_specs
from .conv_configs import (
    AOT_SM_COUNT,
    CONV_CONFIGS,
    ConvConfig,
    choose_split,
    device_arch,
    device_sm_count,
    finalize,
    fused_reduce_trips,
    pow2_at_least_16,
    steps_per_split,
    supergroup_factor,
    table_config,
)
from .conv_cost import flops
from .conv_kernel import _conv_kernel
from .launch import (
    SUPPORTED_DTYPES,
    check_int32_indexing,
    check_launchable,
    check_tensor,
)
from .pdl import pdl_enabled
from .splitk import splitk_reduce


def conv_out_shape(input_shape_nhwc, out_channels, kernel_size, stride, padding, dilation=1) -> tuple:
    n, h, w, _ = input_shape_nhwc
    r, s = (dilation * (k - 1) + 1 for k in kernel_size)  # the dilated filter's extent
    return (n, (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1, out_channels)


class ConvLayer:
    """A convolution prepared once (weights packed at construction) and launched many times.

    With `shortcut_weight` (C_out, C_in2, 1, 1), the layer is a bottleneck block's last 1x1 conv with the
    block's projection shortcut concatenated along K: out = relu?(conv1x1(x) + conv1x1_s2(x2) + bias),
    one GEMM over [x | x2 read with stride `shortcut_stride`], `bias` being the sum of both folded biases.
    `avg_pool` (ResNet-D): the stride-2 1x1 read, of x2 (else of x), averages each in-image 2x2 window.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: int,
        padding: int,
        dilation: int = 1,
        groups: int = 1,
        relu: bool = False,
        has_residual: bool = False,
        dtype: torch.dtype = torch.float16,
        allow_tf32: bool = False,
        shortcut_weight: torch.Tensor | None = None,
        shortcut_stride: int = 1,
        avg_pool: bool = False,
    ):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"ConvLayer: dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not weight.is_floating_point():
            raise ValueError("ConvLayer: weight must be a float tensor of shape (C_out, C_in/groups, R, S)")
        c_out, cg_in, r, s = weight.shape
        if groups < 1 or c_out % groups:
            raise ValueError(f"ConvLayer: C_out={c_out} is not divisible by groups={groups}")
        if min(stride, dilation) < 1 or padding < 0:
            bad = f"stride {stride}, dilation {dilation}, padding {padding}"
            raise ValueError(f"ConvLayer: expected stride >= 1, dilation >= 1 and padding >= 0, got {bad}")
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"ConvLayer: bias must have shape ({c_out},), got {tuple(bias.shape)}")
        self.in_channels = cg_in * groups
        self.out_channels = c_out
        self.stride = stride
        self.padding = padding
        self.dilation = dilation if (r, s) != (1, 1) else 1  # a 1x1's dilation changes nothing: GEMM mode
        self.groups = groups
        self.kernel_size = (r, s)
        self.relu = relu
        self.has_residual = has_residual
        self.dtype = dtype
        self.out_dtype = dtype  # the int8 layer (kernels/conv_int8.py) may write int8, fp16 or int32
        self.acc_dtype = torch.float32  # the accumulator and split-K partials (int32 for int8)
        self.device = weight.device
        self.input_precision = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"

        ng = c_out // groups
        p = supergroup_factor(groups, cg_in, ng)
        self.supergroup = p
        self.kernel_groups = groups // p
        self.kernel_cg = cg_in * p
        self.kernel_ng = ng * p
        # Block-diagonal super-group weights: (G/P, P*NG, P*CG, R, S), zero off the diagonal blocks.
        w = weight.detach().to(torch.float64).reshape(groups // p, p, ng, cg_in, r, s)
        dense = torch.zeros(groups // p, p, ng, p, cg_in, r, s, dtype=torch.float64, device=weight.device)
        for i in range(p):
            dense[:, i, :, i] = w[:, i]
        dense = dense.reshape(c_out, self.kernel_cg, r, s)
        # K-major packing: B[(r*S + s)*CG + c, co]; a K-concatenated shortcut's rows follow.
        packed = dense.permute(2, 3, 1, 0).reshape(r * s * self.kernel_cg, c_out)
        self.shortcut_channels = 0
        self.shortcut_stride = shortcut_stride
        if shortcut_weight is not None:
            packed = torch.cat([packed, self._pack_shortcut(shortcut_weight, shortcut_stride)])
        own_1x1_s2 = (r, s, stride, padding, groups) == (1, 1, 2, 0, 1)
        if avg_pool and not (shortcut_stride == 2 if shortcut_weight is not None else own_1x1_s2):
            raise ValueError("ConvLayer: avg_pool needs a 1x1, stride-2, pad-0, groups=1 conv or shortcut")
        self.avg_pool = avg_pool
        self.weight_packed = packed.to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous().to(weight.device)
        self.gather_cg = self.kernel_cg if self.kernel_cg < 16 else 0
        self._configs: dict[tuple, ConvConfig] = {}
        self._workspaces: dict[tuple, torch.Tensor] = {}

    def _pack_shortcut(self, shortcut_weight, shortcut_stride: int) -> torch.Tensor:
        geometry = (self.kernel_size, self.stride, self.padding, self.groups)
        if geometry != ((1, 1), 1, 0, 1) or self.has_residual:
            raise ValueError(
                "ConvLayer: shortcut_weight needs a 1x1, stride-1, padding-0, groups=1 main conv without "
                "has_residual (the concatenated shortcut is the block's residual)"
            )
        if (
            not isinstance(shortcut_weight, torch.Tensor)
            or shortcut_weight.ndim != 4
            or tuple(shortcut_weight.shape[2:]) != (1, 1)
            or shortcut_weight.shape[0] != self.out_channels
        ):
            raise ValueError(
                f"ConvLayer: shortcut_weight must have shape ({self.out_channels}, C_in2, 1, 1), got "
                f"{tuple(getattr(shortcut_weight, 'shape', ()))}"
            )
        if shortcut_stride not in (1, 2):
            raise ValueError(f"ConvLayer: shortcut_stride must be 1 or 2, got {shortcut_stride}")
        self.shortcut_channels = shortcut_weight.shape[1]
        return shortcut_weight.detach().to(torch.float64).reshape(self.out_channels, -1).t()

    def __repr__(self) -> str:
        shortcut = (
            f", shortcut={self.shortcut_channels}/s{self.shortcut_stride}" if self.shortcut_channels else ""
        )
        return (
            f"ConvLayer({self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
            f"p={self.padding}, d={self.dilation}, g={self.groups}{shortcut}{', avg_pool' * self.avg_pool}, "
            f"dtype={self.dtype})"
        )

    def output_shape(self, input_shape_nhwc) -> tuple[int, int, int, int]:
        return conv_out_shape(
            input_shape_nhwc, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation
        )

    # ------------------------------------------------------------------------------------- config rules

    def kind(self, input_shape_nhwc, sm_count: int = AOT_SM_COUNT) -> str:
        """The config-table layer kind for this input shape: "gather", "small_m" or "large"."""
        if self.gather_cg:
            return "gather"
        n, oh, ow, _ = self.output_shape(input_shape_nhwc)
        tiles_128 = triton.cdiv(n * oh * ow, 128) * self.kernel_groups * triton.cdiv(self.kernel_ng, 128)
        return "small_m" if tiles_128 < sm_count else "large"

    def k_steps(self, block_k: int) -> tuple[int, int]:
        """(K-steps per filter tap, or the whole K in gather mode; K-steps over the shortcut input)."""
        if self.gather_cg:
            kc = triton.cdiv(self.kernel_size[0] * self.kernel_size[1] * self.gather_cg, block_k)
        else:
            kc = triton.cdiv(self.kernel_cg, block_k)
        return kc, triton.cdiv(self.shortcut_channels, block_k)

    def total_k_steps(self, block_k: int) -> int:
        kc, kc2 = self.k_steps(block_k)
        return (kc if self.gather_cg else self.kernel_size[0] * self.kernel_size[1] * kc) + kc2

    def output_tiles(self, input_shape_nhwc, config: ConvConfig) -> int:
        n, oh, ow, _ = self.output_shape(input_shape_nhwc)
        return (
            triton.cdiv(n * oh * ow, config.block_m)
            * self.kernel_groups
            * triton.cdiv(self.kernel_ng, config.block_n)
        )

    def config_for(self, input_shape_nhwc, arch: int, sm_count: int = AOT_SM_COUNT) -> ConvConfig:
        """The config for this input shape on compute capability `arch` (0 = interpreter): the table
        entry, clipped to the layer, split by `choose_split` (never under the interpreter)."""
        kind = self.kind(input_shape_nhwc, sm_count)
        fp32, eight_bit = self.dtype == torch.float32, self.dtype.itemsize == 1
        config = self.clip_config(table_config(arch, fp32, kind, self.avg_pool, eight_bit))
        if arch == 0:
            return config
        k_steps = self.total_k_steps(config.block_k)
        tiles = self.output_tiles(input_shape_nhwc, config)
        split = choose_split(tiles, k_steps, sm_count, config, self.dtype == torch.float32)
        return finalize(config, split, k_steps)

    def clip_config(self, config: ConvConfig) -> ConvConfig:
        """Clip BLOCK_N / BLOCK_K to this layer's per-group channel counts (no tile wider than a group),
        the split to one that leaves no K-slice empty, and num_stages to the K-steps of one slice."""
        block_n = min(config.block_n, pow2_at_least_16(self.kernel_ng))
        k_extent = self.kernel_size[0] * self.kernel_size[1] * self.gather_cg or self.kernel_cg
        if self.shortcut_channels:
            k_extent = max(k_extent, self.shortcut_channels)
        block_k = min(config.block_k, pow2_at_least_16(k_extent))
        k_steps = self.total_k_steps(block_k)
        split = triton.cdiv(k_steps, steps_per_split(k_steps, min(config.split_k, k_steps)))
        return finalize(replace(config, block_n=block_n, block_k=block_k), split, k_steps)

    # ---------------------------------------------------------------------------------------- launching

    def _kernel_args(self, x, residual, out, config: ConvConfig, shortcut_input=None, workspace=(None, None)):
        """The launch's argument and constexpr dictionaries (tensors or aot.Pointer placeholders)."""
        n, h, w, _ = x.shape
        _, oh, ow, _ = out.shape
        h2, w2 = (shortcut_input.shape[1], shortcut_input.shape[2]) if self.shortcut_channels else (0, 0)
        has_bias = self.bias is not None
        kc, kc2 = self.k_steps(config.block_k)
        k_steps = self.total_k_steps(config.block_k)
        channels = (self.kernel_cg, self.shortcut_channels or config.block_k)
        args = dict(
            x_ptr=x,
            w_ptr=self.weight_packed,
            # Absent operands get a dummy pointer (never dereferenced: the constexpr switch is off).
            bias_ptr=self.bias if has_bias else self.weight_packed,
            res_ptr=residual if residual is not None else out,
            out_ptr=out,
            x2_ptr=shortcut_input if shortcut_input is not None else x,
            ws_ptr=workspace[0] if workspace[0] is not None else out,
            lock_ptr=workspace[1] if workspace[1] is not None else self.weight_packed,
            scale_ptr=self.weight_packed,  # dummy, dereferenced only by the int8 layer's epilogue
            M=n * oh * ow,
            H=h,
            W=w,
            OH=oh,
            OW=ow,
            C_IN=self.in_channels,
            C_OUT=self.out_channels,
            CG=self.kernel_cg,
            NG=self.kernel_ng,
            H2=h2,
            W2=w2,
            C_IN2=self.shortcut_channels,
            RES_SCALE=1.0,
            OUT_INV_SCALE=1.0,
        )
        constexprs = dict(
            R=self.kernel_size[0],
            S=self.kernel_size[1],
            STRIDE=self.stride,
            PAD=self.padding,
            DIL=self.dilation,
            GATHER_CG=self.gather_cg,
            KC=kc,
            EVEN_C=not self.gather_cg and all(c % config.block_k == 0 for c in channels),
            HAS_SHORTCUT=bool(self.shortcut_channels),
            AVG_POOL=self.avg_pool,
            STRIDE2=self.shortcut_stride,
            KC2=kc2,
            SPLIT=config.split_k,
            STEPS_PER_SPLIT=steps_per_split(k_steps, config.split_k),
            FUSED_REDUCE=config.fused_reduce,
            REDUCE_ROWS=config.block_m // (fused_reduce_trips(config, self.dtype == torch.float32) or 1),
            HAS_BIAS=has_bias,
            HAS_RESIDUAL=self.has_residual,
            APPLY_RELU=self.relu,
            INPUT_PRECISION=self.input_precision,
            QUANTIZED=False,
            IMPRECISE_ACC=None,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            USE_PDL=False,  # set per launch (pdl_enabled) and per AOT arch (pdl_for_arch)
            PREFETCH_STEPS=min(config.num_stages, steps_per_split(k_steps, config.split_k)),
        )
        return args, constexprs, (self.output_tiles(tuple(x.shape), config), config.split_k)

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        shortcut_input: torch.Tensor | None = None,
        scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """scratch: (fp32, int32 zeros) buffers of at least `scratch_size` elements for split-K, owned by
        the caller (e.g. one pair per CUDA graph); without it the layer keeps its own per shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ConvLayer: x must be a torch.Tensor, got {type(x).__name__}")
        config = self._config(tuple(x.shape), x.device)
        return self.launch(x, residual, out, config=config, shortcut_input=shortcut_input, scratch=scratch)

    def _config(self, input_shape_nhwc: tuple, device: torch.device) -> ConvConfig:
        key = (input_shape_nhwc, device)
        config = self._configs.get(key)
        if config is None:  # decided once per input shape: no table lookups on the hot path
            arch = device_arch(device)
            sm_count = device_sm_count(device.index or 0) if arch else AOT_SM_COUNT
            config = self._configs[key] = self.config_for(input_shape_nhwc, arch, sm_count)
        return config

    def scratch_size(self, input_shape_nhwc) -> tuple[int, int]:
        """(fp32 partials, int32 counters) elements a split-K launch of this input shape needs on this
        layer's device; (0, 0) when it does not split. Callers that run layers one after another on one
        stream can share one scratch pair across layers (the counters are re-armed by each launch)."""
        config = self._config(tuple(input_shape_nhwc), self.device)
        if config.split_k == 1:
            return 0, 0
        n, oh, ow, c_out = self.output_shape(input_shape_nhwc)
        return config.split_k * n * oh * ow * c_out, self.output_tiles(tuple(input_shape_nhwc), config)

    def launch(
        self, x, residual=None, out=None, *, config: ConvConfig, shortcut_input=None, scratch=None
    ) -> torch.Tensor:
        """`__call__` with an explicit config (used by the tests to run every table entry and split)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"ConvLayer: x must be a 4-d NHWC tensor, got {getattr(x, 'shape', type(x))}")
        check_tensor(x, "ConvLayer input x", (*x.shape[:3], self.in_channels), self.dtype, self.device)
        check_launchable(x, "ConvLayer")
        out_shape = self.output_shape(tuple(x.shape))
        if out_shape[1] < 1 or out_shape[2] < 1:
            raise ValueError(f"ConvLayer: input {tuple(x.shape)} is too small for {self!r}")
        if self.has_residual and residual is None:
            raise ValueError("ConvLayer: built with has_residual=True, so a residual tensor is required")
        if not self.has_residual and residual is not None:
            raise ValueError("ConvLayer: built with has_residual=False, but a residual was passed")
        if residual is not None:
            check_tensor(residual, "ConvLayer residual", out_shape, self.dtype, self.device)
        self._check_shortcut(shortcut_input, out_shape)
        if out is None:
            out = torch.empty(out_shape, dtype=self.out_dtype, device=self.device)
        else:
            check_tensor(out, "ConvLayer out", out_shape, self.out_dtype, self.device)
        limit = max(x.numel(), out.numel() * config.split_k)
        if shortcut_input is not None:
            limit = max(limit, shortcut_input.numel())
        check_int32_indexing(limit, "ConvLayer")
        workspace = self._workspace(tuple(x.shape), out_shape, config, scratch)
        args, constexprs, grid = self._kernel_args(x, residual, out, config, shortcut_input, workspace)
        constexprs["USE_PDL"] = pdl = pdl_enabled(x.device)
        _conv_kernel[grid](**args, **constexprs, **config.launch_options(pdl))
        if config.split_k > 1 and not config.fused_reduce:
            m = out_shape[0] * out_shape[1] * out_shape[2]
            splitk_reduce(
                workspace[0], self.bias, residual, out, m=m, c_out=self.out_channels, split=config.split_k,
                relu=self.relu, pdl=pdl,
            )  # fmt: skip
        return out

    def _check_shortcut(self, shortcut_input, out_shape) -> None:
        if not self.shortcut_channels:
            if shortcut_input is not None:
                raise ValueError("ConvLayer: built without shortcut_weight, but a shortcut_input was passed")
            return
        if shortcut_input is None:
            raise ValueError("ConvLayer: built with shortcut_weight, so shortcut_input is required")
        if not isinstance(shortcut_input, torch.Tensor) or shortcut_input.ndim != 4:
            raise ValueError("ConvLayer: shortcut_input must be a 4-d NHWC tensor")
        n2, h2, w2, _ = shortcut_input.shape
        s2 = self.shortcut_stride
        if (n2, (h2 - 1) // s2 + 1, (w2 - 1) // s2 + 1) != tuple(out_shape[:3]):
            raise ValueError(
                f"ConvLayer: shortcut_input {tuple(shortcut_input.shape)} read with stride {s2} does not "
                f"give the output's (N, OH, OW) = {tuple(out_shape[:3])}"
            )
        shape = (n2, h2, w2, self.shortcut_channels)
        check_tensor(shortcut_input, "ConvLayer shortcut_input", shape, self.dtype, self.device)

    def _workspace(self, in_shape, out_shape, config: ConvConfig, scratch=None) -> tuple:
        """(fp32 partials, int32 arrival counters) for a split-K launch, else (None, None).

        Allocated once per (shape, split) and kept: nothing is allocated on the hot path or during
        CUDA-graph replay (the first call, a warm-up, allocates). The counters start at zero and the
        last program of each tile re-arms its counter. One workspace per layer and shape, so launches of
        one layer on two streams at once would share it."""
        if config.split_k == 1:
            return None, None
        m = out_shape[0] * out_shape[1] * out_shape[2]
        if scratch is not None:
            partials, counters = scratch
            need, tiles = config.split_k * m * self.out_channels, self.output_tiles(in_shape, config)
            if partials.dtype != self.acc_dtype or counters.dtype != torch.int32:
                raise TypeError(f"ConvLayer: scratch must be ({self.acc_dtype}, torch.int32) tensors")
            if partials.numel() < need or counters.numel() < tiles:
                raise ValueError(f"ConvLayer: scratch too small, need ({need}, {tiles}) elements")
            return partials[:need].view(config.split_k, m, self.out_channels), counters[:tiles]
        key = (tuple(out_shape), config.split_k, config.block_m, config.block_n)
        ws = self._workspaces.get(key)
        if ws is None:
            partials = torch.empty(
                (config.split_k, m, self.out_channels), dtype=self.acc_dtype, device=self.device
            )
            locks = torch.zeros(self.output_tiles(in_shape, config), dtype=torch.int32, device=self.device)
            ws = self._workspaces[key] = (partials, locks)
        return ws

    def aot_specs(self, input_shape_nhwc, arch: int, config: ConvConfig | None = None) -> list[KernelSpec]:
        """What `__call__` compiles for this input shape on compute capability `arch`, without launching:
        the conv kernel, and the split-K reduce kernel when the config splits K (kernels/conv_aot.py)."""
        return conv_aot_specs(self, input_shape_nhwc, arch, config)

__all__ = ["CONV_CONFIGS", "ConvConfig", "ConvLayer", "conv_out_shape", "device_arch", "flops"]
