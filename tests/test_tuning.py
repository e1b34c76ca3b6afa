"""fastres.tuning's selection: candidates, the parity gate, the injected timer, ties and the budget.

The layers are real (resnet18's Triton plan, run under the interpreter); the timer and the clock are
injected, so a test scripts which tactic is fastest and when the budget runs out.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from e2e import calibrated
from fastres.kernels import ConvConfig

import fastres
from fastres.tuning import tuner
from fastres.tuning.candidates import candidate_space
from fastres.tuning.tactics import CUDNN, CUDNN_TACTIC, Tactic, triton_tactic

SIZE = 32
LAYERS = ("layer1.0.conv1", "layer1.0.conv2")  # two signatures (ReLU; residual + ReLU), the cheapest


@pytest.fixture(scope="module")
def engine():
    model = calibrated("resnet18", 7)
    options = dict(backend="triton", tune=False, self_check=False)
    return fastres.optimize(model, device="cpu", dtype=torch.float32, **options)


@pytest.fixture
def backend(engine, monkeypatch):
    backend = engine.backend
    backend.tuned.clear()
    full = backend.conv_inputs
    monkeypatch.setattr(
        backend, "conv_inputs", lambda *a: {k: v for k, v in full(*a).items() if k in LAYERS}, raising=False
    )
    yield backend
    backend.tuned.clear()


def _label(what: str) -> str:
    return what.rsplit(" ", 1)[1]


def _tune(backend, timer, *, clock=None, budget=1e9, max_candidates=2):
    clock = clock or itertools.count().__next__
    start = clock()
    return tuner.tune_batch(
        backend,
        1,
        SIZE,
        SIZE,
        timer=timer,
        out_of_time=lambda: clock() - start >= budget,
        arch=0,
        sm_count=132,
        max_candidates=max_candidates,
        compile_arch=None,
    )


def _labels(backend, name):
    signature, shape = backend.conv_inputs(1, SIZE, SIZE)[name]
    return [t.label for t in candidate_space(backend.layers[name], shape, 0, 132, max_candidates=2).tactics]


@pytest.mark.interpreter
def test_the_fastest_gated_tactic_wins(backend):
    fastest = {name: _labels(backend, name)[2] for name in LAYERS}  # the second variant after the rule
    timer = lambda fn, what: 0.5 if _label(what) in fastest.values() else 1.0
    results = _tune(backend, timer)
    assert [r.ops[0] for r in results] == list(LAYERS)
    for r in results:
        assert r.chosen.label == fastest[r.ops[0]] and r.reason == "fastest tactic"
        assert r.rule_s == 1.0 and r.chosen_s == 0.5 and r.speedup == 2.0
        assert len(r.timed) == 4  # rule, two variants, cuDNN: all passed the gate
        assert backend.tuned[(r.signature, 1)] == r.chosen


@pytest.mark.interpreter
def test_ties_keep_the_rule_config_and_are_deterministic(backend):
    # Every tactic within the tie tolerance of the rule: the rule stays.
    near = lambda fn, what: 1.0 if _label(what) == _labels(backend, LAYERS[0])[0] else 0.99
    assert all(r.chosen == r.rule and "tie" in r.reason for r in _tune(backend, near))
    # Two variants equally and clearly faster: the earlier candidate, on every run.
    labels = _labels(backend, LAYERS[0])
    equal = lambda fn, what: {labels[1]: 0.5, labels[2]: 0.5}.get(_label(what), 1.0)
    first, again = _tune(backend, equal)[0], _tune(backend, equal)[0]
    assert first.chosen.label == again.chosen.label == labels[1]


@pytest.mark.interpreter
def test_budget_spent_keeps_the_rule_config_for_the_rest(backend):
    timed = []
    timer = lambda fn, what: timed.append(what) or 1.0
    # The clock advances one second per reading: the first layer starts inside a 3 s budget, the
    # budget runs out during it (not every tactic is timed), and the second layer never starts.
    results = _tune(backend, timer, budget=3)
    first, second = results
    assert first.tuned and any("budget" in why for _, why in first.dropped)
    assert not second.tuned and second.chosen == second.rule and "budget" in second.reason
    assert (second.signature, 1) not in backend.tuned  # not cached: a later run can finish it
    assert all(LAYERS[1] not in w for w in timed)
    assert [r.tuned for r in _tune(backend, timer, budget=0)] == [False, False]


@pytest.mark.interpreter
def test_an_end_to_end_revert_changes_only_the_layers_it_reverted(backend):
    """The first layer's variant wins alone but the network is slower with it: that layer reverts to
    the rules with the end-to-end reason, and the layer the budget never reached keeps its own."""
    winner = _labels(backend, LAYERS[0])[1]
    times = {winner: 0.5, "tuned": 2.0}  # "network@b1 tuned" loses to "network@b1 rules"
    timer = lambda fn, what: times.get(_label(what), 1.0)
    readings = itertools.count()
    report = tuner.tune_backend(
        backend, [1], SIZE, SIZE, budget_s=4, timer=timer, clock=readings.__next__, max_candidates=2
    )
    first, second = report.layers
    assert first.tuned and first.chosen == first.rule and "slower end to end" in first.reason
    assert not second.tuned and second.chosen == second.rule and second.reason.startswith("budget spent")
    assert [n.kept for n in report.networks] == [False] and backend.tuned == {}


@pytest.mark.interpreter
def test_a_wrong_candidate_is_discarded_never_chosen(backend, monkeypatch):
    wrong = _labels(backend, LAYERS[0])[1]
    run = tuner._LayerContext.run

    def corrupted(self, tactic):
        out = run(self, tactic)
        if tactic.label == wrong:
            out.view(-1)[::7] += 1.0  # a deliberately wrong kernel result
        return out

    monkeypatch.setattr(tuner._LayerContext, "run", corrupted)
    timer = lambda fn, what: 0.1 if _label(what) == wrong else 1.0  # it would win on time
    result = _tune(backend, timer)[0]
    assert result.chosen.label != wrong and result.chosen == result.rule
    assert [why for label, why in result.dropped if label == wrong][0].startswith("parity: relative error")
    assert wrong not in [label for label, _ in result.timed]


@pytest.mark.interpreter
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_the_gate_bound_follows_the_layers_precision(backend, monkeypatch, tf32):
    """Triton tactics off cuDNN by TF32's rounding (5e-4 relative): dropped for an IEEE fp32 layer,
    timed for an allow_tf32 one (where cuDNN runs TF32 too), so TF32 layers are not all sent to cuDNN."""
    if tf32:
        for name in LAYERS:
            monkeypatch.setattr(backend.layers[name], "input_precision", "tf32")
    run = tuner._LayerContext.run

    def rounded(self, tactic):
        out = run(self, tactic)
        if tactic.kind != CUDNN:
            out.view(-1)[::5] += 5e-4 * out.abs().max()
        return out

    monkeypatch.setattr(tuner._LayerContext, "run", rounded)
    for result in _tune(backend, lambda fn, what: 1.0):
        parity_drops = [label for label, why in result.dropped if why.startswith("parity")]
        if tf32:
            assert not parity_drops and result.chosen == result.rule
        else:
            assert result.rule.label in parity_drops and result.chosen == CUDNN_TACTIC


@pytest.mark.interpreter
def test_a_rule_config_failing_the_gate_loses_to_a_correct_tactic(backend, monkeypatch):
    rule = _labels(backend, LAYERS[0])[0]
    run = tuner._LayerContext.run
    monkeypatch.setattr(
        tuner._LayerContext,
        "run",
        lambda self, t: run(self, t).fill_(float("nan")) if t.label == rule else run(self, t),
    )
    result = _tune(backend, lambda fn, what: 1.0)[0]
    assert result.chosen != result.rule and "rule config failed" in result.reason
    assert "non-finite" in dict(result.dropped)[rule]


def test_choose_prefers_the_rule_within_the_tolerance():
    rule, a, b = (triton_tactic(ConvConfig(64, 64, 32, 4, s)) for s in (1, 2, 3))
    assert tuner.choose(rule, [(rule, 1.0), (a, 0.98)])[0] == rule
    assert tuner.choose(rule, [(rule, 1.0), (a, 0.5), (b, 0.5)])[0] == a
    assert tuner.choose(rule, [(a, 0.7), (CUDNN_TACTIC, 0.6)])[0] == CUDNN_TACTIC


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("arch", [90, 80])
def test_candidate_space_is_legal_for_the_layer(engine, arch, dtype):
    """Rule first, cuDNN last, no duplicates, every config already clipped to the layer, and no
    pipeline larger than the arch's shared memory."""
    from fastres.backends.triton_backend import TritonBackend
    from fastres.tuning.candidates import SMEM_KIB, smem_bytes

    backend = TritonBackend(engine.plan, "cpu", dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    for batch in (1, 256):
        for name, (_, shape) in backend.conv_inputs(batch, 224, 224).items():
            layer = backend.layers[name]
            space = candidate_space(layer, shape, arch, 132)
            assert space.rule.config == layer.config_for(shape, arch, 132)
            assert space.tactics[-1].kind == CUDNN
            configs = [t.config for t in space.tactics[:-1]]
            assert len(set(configs)) == len(configs)
            assert all(layer.clip_config(c) == c for c in configs)
            assert all(smem_bytes(c, elem) <= SMEM_KIB[arch] * 1024 for c in configs[1:])
            if dtype == torch.float32:
                assert all(c.block_m * c.block_n <= 128 * 64 for c in configs[1:])


def test_tactics_round_trip_through_json():
    config = ConvConfig(128, 64, 32, 8, 3, maxnreg=128, split_k=4, fused_reduce=False)
    for tactic in (triton_tactic(config), CUDNN_TACTIC):
        assert Tactic.from_json(tactic.to_json()) == tactic
    for bad in ({"kind": "triton"}, {"kind": "x"}, {"kind": "triton", "config": {"block_m": 0}}, None):
        with pytest.raises(ValueError):
            Tactic.from_json(bad)


@pytest.mark.interpreter
def test_tune_backend_with_no_budget_times_nothing_and_keeps_the_rules(backend):
    timed = []
    report = tuner.tune_backend(
        backend, [1, 3], SIZE, SIZE, budget_s=0, timer=lambda fn, what: timed.append(what), progress=False
    )
    assert report.interpreted and report.budget_spent and not timed
    assert [(r.batch, r.tuned, r.chosen == r.rule) for r in report.layers] == [(1, False, True)] * 2 + [
        (3, False, True)
    ] * 2
    assert [(n.batch, n.rules_s, n.kept) for n in report.networks] == [(1, None, True), (3, None, True)]
    assert backend.tuned == {}


@pytest.mark.interpreter
def test_every_batch_gets_its_share_of_the_budget(backend):
    """A budget that the first batch alone would spend is shared out: the last batch is tuned too."""
    now = [0.0]

    def timer(fn, what):  # every timing takes one second of the injected clock
        now[0] += 1.0
        return 1.0

    report = tuner.tune_backend(
        backend, [1, 3], SIZE, SIZE, budget_s=4, timer=timer, clock=lambda: now[0], max_candidates=4,
        progress=False,
    )  # fmt: skip
    # 2 s per batch: two tactics of the first layer, then the second layer keeps its rule config.
    # Shared as one pool, the first batch would time four tactics and leave nothing for batch 3.
    assert [(r.batch, len(r.timed), r.tuned) for r in report.layers] == [
        (1, 2, True), (1, 0, False), (3, 2, True), (3, 0, False)
    ]


@pytest.mark.interpreter
def test_an_interrupted_tune_keeps_and_caches_the_layers_chosen_before(backend, tmp_path):
    """A time limit's SIGINT during the second layer: the first layer's choice is reported as it is
    made, cached, and the KeyboardInterrupt goes on to the caller (the CLI takes the report instead)."""
    from fastres.tuning.cache import TuneCache
    from fastres.tuning.use import tune_and_cache

    second = backend.conv_inputs(1, SIZE, SIZE)[LAYERS[1]][0]  # its signature: what the timer is told

    def timer(fn, what):
        if what.startswith(second):
            raise KeyboardInterrupt
        return 1.0

    seen = []
    options = dict(timer=timer, max_candidates=1, progress=False, on_layer=seen.append)
    report = tuner.tune_backend(backend, [1], SIZE, SIZE, **options)
    assert report.interrupted and [r.ops[0] for r in report.layers] == [LAYERS[0]] == [r.ops[0] for r in seen]
    assert [(n.batch, n.note) for n in report.networks] == [(1, "interrupted: not timed")]
    backend.tuned.clear()
    cache = TuneCache(backend.device, root=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tune_and_cache(backend, [1], SIZE, SIZE, cache=cache, **options)
    assert [sig for sig, _ in cache.tactics()] == [report.layers[0].signature]


def test_the_cuda_timer_spins_the_gpu_past_each_launch(monkeypatch):
    """The GPU calls are faked (no GPU here): what is checked is the order the timer issues them in,
    and that each repeat's spin outlasts the CPU time of a launch, so the events time the kernel."""
    import time

    from fastres.tuning import timing

    calls = []

    class Event:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            calls.append("start" if not calls or calls[-1] != "fn" else "end")
            self.at = len(calls)

        def elapsed_time(self, end):
            return 0.004  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append(("spin", cycles)))
    launch_s = 2e-3

    def fn():
        time.sleep(launch_s)  # a slow launch from the CPU
        calls.append("fn")

    timer = timing.CudaTimer(torch.device("cuda", 0), warmup=2, repeats=3)
    timer.flush = type("Flush", (), {"zero_": lambda self: calls.append("flush")})()
    assert timer(fn, "layer") == pytest.approx(4e-6)
    repeats = calls[calls.index("sync") + 2 : -1]  # after the warm-up, the sync and the enqueue probe
    assert calls[-1] == "sync" and len(repeats) == 3 * 5
    for i in range(3):
        flush, (spin, cycles), *rest = repeats[5 * i : 5 * i + 5]
        assert (flush, spin, rest) == ("flush", "spin", ["start", "fn", "end"])
        assert cycles >= 4 * launch_s * timing.SPIN_HZ
    assert timing.spin_cycles(0.0) == int(timing.SPIN_MIN_S * timing.SPIN_HZ)
    assert timing.spin_cycles(10.0) == int(timing.SPIN_MAX_S * timing.SPIN_HZ)
