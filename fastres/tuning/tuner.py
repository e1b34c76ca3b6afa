"""Per-layer tactic selection for a Triton plan: candidates, the parity gate, timing, a budget.

For each batch size, each distinct conv layer (by `layer_signature`; the stem keeps its own kernel) is
set up in its own context: random inputs of its real shape (batch and image size as asked), its real
epilogue operands, its output buffer. Every tactic of its `candidate_space` then runs once into a
NaN-poisoned buffer and passes the parity gate or is discarded; tactics that fail to compile or spill
on the device are dropped before; the survivors are timed by the injected timer. The fastest wins,
unless the rule config is within `TIE_TOLERANCE` of it (timing noise is no reason to leave the rule);
exact ties go to the earlier candidate, so the choice is deterministic.

The budget (seconds of the injected clock) bounds the search, shared out between the batch sizes: each
batch gets an equal part of what is left when it starts, so the first batch cannot spend it all. Once
a batch's part is spent no further tactic is timed, and its layers not yet started keep the rule config
(and are not cached, so a later run can finish them). Then the whole network is timed with the rules
and with the choices (with its CUDA graph on a GPU): a set of local wins that loses end to end is
dropped for that batch, and the rules are kept. The network timing is not charged to the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.aot import interpreting
from ..kernels.conv_configs import AOT_SM_COUNT, device_arch, device_sm_count
from ..progress import Progress
from .candidates import candidate_space, compile_problem
from .gate import parity_problem
from .tactics import CUDNN, Tactic, batch_bucket, triton_tactic
from .timing import Timer, default_timer, on_device

TIE_TOLERANCE = 0.03  # a tactic must beat the rule config by more than this fraction to replace it


@dataclass
class LayerResult:
    signature: str
    ops: list[str]  # the plan's convs sharing this signature
    batch: int
    rule: Tactic
    chosen: Tactic
    rule_s: float | None = None
    chosen_s: float | None = None
    reason: str = ""  # why the choice is what it is (winner, tie, budget, cached, ...)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (tactic label, why)
    timed: list[tuple[str, float]] = field(default_factory=list)  # (tactic label, seconds)
    tuned: bool = True  # False: not searched (budget spent); not cached

    @property
    def speedup(self) -> float | None:
        if self.rule_s and self.chosen_s:
            return self.rule_s / self.chosen_s
        return None


@dataclass
class NetworkResult:
    batch: int
    rules_s: float | None
    tuned_s: float | None
    kept: bool  # the choices stand (False: they lost end to end, or nothing changed)
    note: str = ""


@dataclass
class TuneReport:
    layers: list[LayerResult]
    networks: list[NetworkResult]
    interpreted: bool
    elapsed_s: float
    budget_s: float
    network_s: float = 0.0  # of elapsed_s, the whole-network checks (they run after the budget)
    interrupted: bool = False  # stopped by KeyboardInterrupt (SIGINT): the layers chosen until then

    @property
    def budget_spent(self) -> bool:
        return any(not r.tuned for r in self.layers)


def choose(rule: Tactic, timed: list[tuple[Tactic, float]]) -> tuple[Tactic, float, str]:
    """The winner among gated, timed tactics (in candidate order): the fastest, unless the rule config
    is within TIE_TOLERANCE of it; exact ties go to the earlier candidate."""
    best, best_s = min(timed, key=lambda item: item[1])  # min keeps the first of equal times
    rule_s = next((s for t, s in timed if t == rule), None)
    if rule_s is None:
        return best, best_s, "fastest tactic (the rule config failed or was dropped)"
    if best == rule:
        return rule, rule_s, "rule config is fastest"
    if rule_s <= best_s * (1 + TIE_TOLERANCE):
        return rule, rule_s, f"tie within {TIE_TOLERANCE:.0%}: rule config kept"
    return best, best_s, "fastest tactic"


class _LayerContext:
    """One conv with inputs of its real shape and its output buffer, able to run any tactic."""

    def __init__(self, backend, op_name: str, input_shape: tuple, seed: int):
        self.layer = backend.layers[op_name]
        self.cudnn = backend.cudnn_layer(op_name)
        op = next(op for op in backend.plan.ops if op.name == op_name)
        device, dtype = backend.device, backend.dtype
        gen = torch.Generator().manual_seed(seed)
        rand = lambda shape: torch.randn(shape, generator=gen).to(device, dtype)
        self.x = rand(input_shape)
        out_shape = self.layer.output_shape(input_shape)
        self.residual = rand(out_shape) if op.residual else None
        self.shortcut = None
        if op.shortcut_input is not None:
            s = op.shortcut_stride
            n, oh, ow, _ = out_shape
            self.shortcut = rand((n, oh * s, ow * s, op.shortcut_weight.shape[1]))
        self.out = torch.empty(out_shape, device=device, dtype=dtype)

    def run(self, tactic: Tactic) -> torch.Tensor:
        if tactic.kind == CUDNN:
            return self.cudnn(self.x, self.residual, self.out, self.shortcut)
        return self.layer.launch(
            self.x, self.residual, self.out, config=tactic.config, shortcut_input=self.shortcut
        )


def _search_layer(
    ctx: _LayerContext,
    result: LayerResult,
    space,
    timer: Timer,
    *,
    arch: int,
    compile_arch: int | None,
    out_of_time: Callable[[], bool],
) -> None:
    dtype, tf32 = ctx.layer.dtype, getattr(ctx.layer, "input_precision", "ieee") == "tf32"
    reference = ctx.run(Tactic(CUDNN)).clone()
    timed: list[tuple[Tactic, float]] = []
    for tactic in space.tactics:
        if timed and out_of_time():
            result.dropped.append((tactic.label, "budget spent before it was timed"))
            continue
        if tactic.kind != CUDNN and compile_arch:
            problem = compile_problem(ctx.layer, tuple(ctx.x.shape), tactic.config, compile_arch)
            if problem:
                result.dropped.append((tactic.label, problem))
                continue
        try:
            ctx.out.fill_(float("nan"))
            problem = parity_problem(ctx.run(tactic), reference, dtype, tf32)
        except Exception as exc:  # a tactic that cannot run here is a dropped tactic, not a failed tune
            problem = f"failed to run: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if problem:
            result.dropped.append((tactic.label, problem))
            continue
        seconds = timer(
            lambda tactic=tactic: ctx.run(tactic), f"{result.signature}@b{result.batch} {tactic.label}"
        )
        timed.append((tactic, seconds))
        result.timed.append((tactic.label, seconds))
    if not timed:
        result.reason = "no tactic passed the gate: rule config kept"
        return
    result.rule_s = next((s for t, s in timed if t == space.rule), None)
    result.chosen, result.chosen_s, result.reason = choose(space.rule, timed)


def tune_batch(
    backend,
    batch: int,
    height: int,
    width: int,
    *,
    timer: Timer,
    out_of_time,
    arch: int,
    sm_count: int,
    max_candidates: int | None,
    compile_arch: int | None,
    known=None,
    bar: Progress | None = None,
    on_layer: Callable[[LayerResult], None] | None = None,
) -> list[LayerResult]:
    """Choose a tactic per distinct conv for this input size; sets `backend.tuned` for its bucket.
    `on_layer(result)` sees each layer's result as soon as it is chosen."""
    bucket = batch_bucket(batch)
    groups: dict[str, list] = {}
    for name, (signature, shape) in backend.conv_inputs(batch, height, width).items():
        groups.setdefault(signature, [shape, []])[1].append(name)
    results = []
    for index, (signature, (shape, names)) in enumerate(groups.items()):
        layer = backend.layers[names[0]]
        rule = triton_tactic(layer.config_for(shape, arch, sm_count))
        result = LayerResult(signature, names, batch, rule, rule)
        cached = (known or {}).get((signature, bucket))
        if cached is not None:
            result.chosen, result.reason = cached, "from the cache"
        elif out_of_time():
            result.reason, result.tuned = "budget spent: rule config kept", False
        else:
            space = candidate_space(layer, shape, arch, sm_count, max_candidates=max_candidates)
            result.dropped += space.dropped
            ctx = _LayerContext(backend, names[0], shape, seed=index)
            _search_layer(
                ctx, result, space, timer, arch=arch, compile_arch=compile_arch, out_of_time=out_of_time
            )
        if result.tuned:
            backend.tuned[(signature, bucket)] = result.chosen
        results.append(result)
        if on_layer is not None:
            on_layer(result)
        if bar is not None:
            bar.update()
    return results


def _time_network(backend, batch: int, height: int, width: int, timer: Timer, what: str) -> float:
    from ..runner import Runner

    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(7))
    x = x.to(backend.device, backend.dtype)
    runner = Runner(backend, x, use_cuda_graph=backend.device.type == "cuda")  # applies backend.tuned
    return timer(lambda: runner(x), what)


def network_check(backend, batch: int, height: int, width: int, timer: Timer) -> NetworkResult:
    """Time the whole plan with the rules and with this bucket's choices; drop the choices if they
    lose end to end. On a GPU each forward is a CUDA-graph replay."""
    bucket = batch_bucket(batch)
    mine = {k: v for k, v in backend.tuned.items() if k[1] == bucket}
    for key in mine:
        del backend.tuned[key]
    rules_s = _time_network(backend, batch, height, width, timer, f"network@b{batch} rules")
    backend.tuned.update(mine)
    tuned_s = _time_network(backend, batch, height, width, timer, f"network@b{batch} tuned")
    if tuned_s > rules_s * (1 + TIE_TOLERANCE):
        for key in mine:
            del backend.tuned[key]
        backend.apply_tuned(batch, height, width)
        return NetworkResult(batch, rules_s, tuned_s, False, "slower end to end than the rules: rules kept")
    return NetworkResult(batch, rules_s, tuned_s, True)


def tune_backend(
    backend,
    batches,
    height: int,
    width: int,
    *,
    budget_s: float = 60.0,
    timer: Timer | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_candidates: int | None = None,
    known=None,
    compile_check: bool = True,
    progress: bool = True,
    on_layer: Callable[[LayerResult], None] | None = None,
) -> TuneReport:
    """Tune every distinct conv of a TritonBackend's plan at each batch size, within `budget_s`.

    known: {(signature, bucket): Tactic} already chosen (the cache): applied, not searched again.
    compile_check: on a GPU, compile each Triton tactic ahead of time for the device's arch first and
    drop those that spill (kernels/aot.py); nothing to compile under the interpreter.
    on_layer(result): each layer's result as soon as it is chosen. A KeyboardInterrupt (a time limit's
    SIGINT) ends the search: the report holds what was chosen until then, `interrupted` set.
    """
    start = clock()
    device = backend.device
    arch = device_arch(device)
    sm_count = device_sm_count(device.index or 0) if arch else AOT_SM_COUNT
    compile_arch = arch if compile_check and arch and not interpreting() else None
    distinct = len({sig for sig, _ in backend.conv_inputs(1, height, width).values()})
    bar = Progress(distinct * len(batches), "tuning", progress)
    layers, networks, network_s, interrupted = [], [], 0.0, False

    def chosen(result: LayerResult) -> None:
        layers.append(result)
        if on_layer is not None:
            on_layer(result)

    with on_device(device):  # Triton launches on the current CUDA device
        try:
            for i, batch in enumerate(batches):
                # Each batch gets an equal share of what is left, so the first batch cannot spend the
                # budget of all (what a batch leaves over goes to the ones after it).
                batch_start = clock()
                share = (budget_s - (batch_start - start - network_s)) / (len(batches) - i)
                out_of_time = lambda: clock() - batch_start >= share  # noqa: B023 (used in this turn only)
                batch_timer = timer or default_timer(device, batch)
                tune_batch(
                    backend,
                    batch,
                    height,
                    width,
                    timer=batch_timer,
                    out_of_time=out_of_time,
                    arch=arch,
                    sm_count=sm_count,
                    max_candidates=max_candidates,
                    compile_arch=compile_arch,
                    known=known,
                    bar=bar,
                    on_layer=chosen,
                )
                if not any(r.batch == batch and r.timed for r in layers):  # all cached or out of budget
                    networks.append(NetworkResult(batch, None, None, True, "nothing searched: not timed"))
                    continue
                network_start = clock()
                networks.append(network_check(backend, batch, height, width, batch_timer))
                network_s += clock() - network_start
        except KeyboardInterrupt:
            interrupted = True
            for batch in dict.fromkeys(r.batch for r in layers):
                if all(net.batch != batch for net in networks):
                    networks.append(NetworkResult(batch, None, None, True, "interrupted: not timed"))
        finally:
            bar.close()
    for net in networks:
        if not net.kept:  # reverted end to end: what the report and the cache record is the rules
            for r in layers:  # only the layers it changed: a budget-spent layer keeps its own reason
                if r.batch == net.batch and r.chosen != r.rule:
                    r.chosen, r.chosen_s, r.reason = r.rule, r.rule_s, net.note
    elapsed = clock() - start
    return TuneReport(layers, networks, interpreting(), elapsed, budget_s, network_s, interrupted)
