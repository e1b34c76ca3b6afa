"""Where tuning meets the engine: the cache applied at load, tuning on first use, the self-check.

`prepare_backend` is what `fastres.load(..., tune=, self_check=)` runs on a Triton backend:
* tune="cached" (default): the cache's choices for this device are applied; nothing is timed, so a
  load never takes surprise minutes. tune=False: the rule table only. tune=True: as "cached", and each
  new input size whose batch bucket has no entry is tuned on first use within the budget
  (`FirstUseTuner`), under a lock, so of several replicas on one node the first tunes and the rest
  then read its results. An unwritable cache folder warns and runs untuned.
* the self-check (selfcheck.py): self_check=None runs it on a GPU when the cache holds no verdict for
  this plan; True runs it anywhere (the CPU tests do, under the interpreter); False never.
"""

from __future__ import annotations

import contextlib
import warnings

from ..errors import ConfigError
from .cache import CacheWarning, TuneCache, batch_bucket, entry_key

TUNE_MODES = ("cached", True, False)
DEFAULT_BUDGET_S = 60.0


def check_tune_mode(tune) -> None:
    if not (tune is True or tune is False or tune == "cached"):
        raise ConfigError(f"tune must be 'cached', True or False, got {tune!r}")


def tune_and_cache(
    backend,
    batches,
    height: int,
    width: int,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    cache: TuneCache | None = None,
    retune: bool = False,
    return_interrupted: bool = False,
    **options,
):
    """Tune `backend` at these batch sizes (tuning.tuner.tune_backend), apply and cache the choices.

    Entries already cached are reused unless retune. Returns the TuneReport. Interrupted (SIGINT), it
    caches what was chosen until then and raises KeyboardInterrupt again, unless return_interrupted
    (then the report says `interrupted`)."""
    from .tuner import tune_backend

    cache = cache or TuneCache(backend.device)
    lock = cache.tuning_lock() if cache.writable() else contextlib.nullcontext()
    with lock:
        known = {} if retune else cache.tactics()
        backend.tuned.update(known)
        report = tune_backend(backend, batches, height, width, budget_s=budget_s, known=known, **options)
        entries = {
            entry_key(r.signature, batch_bucket(r.batch)): {
                "tactic": r.chosen.to_json(),
                "rule_ms": None if r.rule_s is None else r.rule_s * 1e3,
                "tuned_ms": None if r.chosen_s is None else r.chosen_s * 1e3,
                "reason": r.reason,
                "interpreted": report.interpreted,
            }
            for r in report.layers
            if r.tuned and r.reason != "from the cache"
        }
        if entries:
            cache.update(layers=entries)
    if report.interrupted and not return_interrupted:
        raise KeyboardInterrupt  # after caching what was chosen before it
    return report


class FirstUseTuner:
    """tune=True: tunes each input size's batch bucket the first time the engine sees it."""

    def __init__(self, backend, cache: TuneCache, budget_s: float):
        self.backend, self.cache, self.budget_s = backend, cache, budget_s
        self.done: set[tuple[int, int, int]] = set()

    def __call__(self, batch: int, height: int, width: int) -> None:
        key = (batch_bucket(batch), height, width)
        if key in self.done:
            return
        self.done.add(key)
        signatures = {sig for sig, _ in self.backend.conv_inputs(batch, height, width).values()}
        if all((sig, key[0]) in self.backend.tuned for sig in signatures):
            return  # every layer already has a cached choice for this bucket
        tune_and_cache(
            self.backend, [batch], height, width, budget_s=self.budget_s, cache=self.cache, progress=False
        )


def prepare_backend(backend, *, tune="cached", self_check=None, budget_s: float = DEFAULT_BUDGET_S):
    """(the backend to run, a FirstUseTuner or None) for a TritonBackend loaded with these options."""
    from .selfcheck import SelfCheckVerdict, plan_key, run_self_check, warn_verdict

    check_tune_mode(tune)
    cache = TuneCache(backend.device)
    first_use = None
    if tune is not False:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CacheWarning)
            backend.tuned.update(cache.tactics())
        if tune is True:
            if cache.writable():
                first_use = FirstUseTuner(backend, cache, budget_s)
            else:
                warnings.warn(
                    f"tune=True: the tuning cache folder {cache.root} is not writable; running "
                    "untuned (set FASTRES_CACHE to a writable folder)",
                    CacheWarning,
                    stacklevel=4,
                )
    if self_check is False or (self_check is None and backend.device.type != "cuda"):
        return backend, first_use
    key = plan_key(backend)
    recorded = None if self_check is True else cache.verdict(key)
    if recorded is None:
        verdict = run_self_check(backend)
        cache.update(self_check={key: verdict.to_json()})
        recorded = verdict.to_json()
    try:
        verdict = SelfCheckVerdict(**recorded)
    except TypeError:  # a malformed record: check again
        verdict = run_self_check(backend)
        cache.update(self_check={key: verdict.to_json()})
    warn_verdict(verdict, str(backend.device))
    if verdict.action == "cudnn":
        for name in verdict.drifted:
            backend.use_cudnn(name)
    elif verdict.action == "torch":
        from ..backends.torch_backend import TorchBackend

        return TorchBackend(backend.plan, backend.device, backend.dtype, allow_tf32=backend.allow_tf32), None
    return backend, first_use
