"""The tuning cache: robust to bad files, atomic, safe with concurrent writers, optional when read-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from e2e import calibrated
from fastres.kernels import ConvConfig

import fastres
from fastres.cli import main
from fastres.tuning.cache import FORMAT, CacheWarning, TuneCache
from fastres.tuning.tactics import CUDNN_TACTIC, triton_tactic

KEY = {"gpu": "test GPU", "sm_count": 7, "capability": "9.0", "driver": "1", "cuda": "12", "torch": "t"}
TACTIC = triton_tactic(ConvConfig(64, 128, 32, 4, 3, split_k=2))


def _entry(tactic=TACTIC) -> dict:
    return {"tactic": tactic.to_json(), "rule_ms": 1.0, "tuned_ms": 0.5}


def _cache(root) -> TuneCache:
    return TuneCache(torch.device("cpu"), root=root, key=KEY)


def test_entries_round_trip(tmp_path):
    cache = _cache(tmp_path)
    assert cache.tactics() == {}
    assert cache.update(layers={"convA@b1": _entry(), "convB@b8": _entry(CUDNN_TACTIC)})
    assert _cache(tmp_path).tactics() == {("convA", 1): TACTIC, ("convB", 8): CUDNN_TACTIC}
    assert not list(tmp_path.glob(".tuning-*.tmp")), "the temp file was renamed into place"


def _good_file(cache) -> str:
    cache.update(layers={"convA@b1": _entry()})
    return cache.path.read_text()


BAD_FILES = {
    "empty": lambda good: "",
    "corrupt": lambda good: "\x00\xff not json at all",
    "truncated": lambda good: good[: len(good) // 2],
    "foreign": lambda good: good.replace('"test GPU"', '"another GPU"'),
    "stale": lambda good: good.replace(f'"format": {FORMAT}', '"format": 0'),
    "not_an_object": lambda good: "[1, 2, 3]",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_warns_is_ignored_and_rewritten(tmp_path, kind):
    cache = _cache(tmp_path)
    cache.path.write_bytes(BAD_FILES[kind](_good_file(cache)).encode("utf-8", "surrogateescape"))
    with pytest.warns(CacheWarning, match=str(cache.path.name)):
        assert cache.tactics() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read again, it is a valid (empty) file
        assert cache.tactics() == {}
        assert cache.update(layers={"convB@b1": _entry()})
        assert cache.tactics() == {("convB", 1): TACTIC}


def test_malformed_entries_are_dropped_the_rest_kept(tmp_path):
    cache = _cache(tmp_path)
    cache.update(layers={"convA@b1": _entry()})
    data = json.loads(cache.path.read_text())
    data["layers"].update({"no_bucket": _entry(), "convC@b2": {"tactic": {"kind": "warp-drive"}}})
    cache.path.write_text(json.dumps(data))
    with pytest.warns(CacheWarning, match="2 malformed entries"):
        assert cache.tactics() == {("convA", 1): TACTIC}


WRITER = """
import sys, torch
from fastres.tuning.cache import TuneCache
from fastres.tuning.tactics import CUDNN_TACTIC
cache = TuneCache(torch.device("cpu"), root=sys.argv[1], key={key!r})
for i in range(int(sys.argv[3])):
    assert cache.update(layers={{f"{{sys.argv[2]}}{{i}}@b1": {{"tactic": CUDNN_TACTIC.to_json()}}}})
"""


def test_concurrent_writers_lose_no_entry(tmp_path):
    script = WRITER.format(key=KEY)
    n = 15
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"writer{w}_", str(n)])
        for w in range(2)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entries = _cache(tmp_path).tactics()
    assert sorted(entries) == sorted((f"writer{w}_{i}", 1) for w in range(2) for i in range(n))


def _unwritable(tmp_path) -> Path:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "cache"  # no folder can be made under a regular file, whoever we run as


def test_an_unwritable_folder_warns_and_the_load_runs_untuned(tmp_path, monkeypatch):
    root = _unwritable(tmp_path)
    cache = _cache(root)
    assert not cache.writable()
    with pytest.warns(CacheWarning, match="cannot write"):
        assert not cache.update(layers={"convA@b1": _entry()})
    assert cache.tactics() == {}  # reading a missing folder is fine and quiet
    monkeypatch.setenv("FASTRES_CACHE", str(root))
    with pytest.warns(CacheWarning, match="not writable; running untuned"):
        engine = fastres.optimize(calibrated("resnet18", 7), device="cpu", dtype=torch.float32,
                                  backend="triton", tune=True, self_check=False)  # fmt: skip
    assert engine._tuner is None and not engine.backend.tuned


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_warns(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.warns(CacheWarning):
            assert not _cache(tmp_path).update(layers={"convA@b1": _entry()})
    finally:
        tmp_path.chmod(0o700)


def test_load_applies_cached_choices_and_tune_false_ignores_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    model = calibrated("resnet18", 7)
    options = dict(device="cpu", dtype=torch.float32, backend="triton", self_check=False)
    plain = fastres.optimize(model, **options, tune=False)
    signature, shape = plain.backend.conv_inputs(3, 32, 32)["layer2.0.conv1"]
    cache = TuneCache(torch.device("cpu"))
    cache.update(layers={f"{signature}@b4": _entry(CUDNN_TACTIC)})
    engine = fastres.optimize(model, **options)  # tune="cached" is the default
    assert engine.backend.tuned == {(signature, 4): CUDNN_TACTIC}
    engine.backend.make_workspace(3, 32, 32)  # batch 3 is in bucket 4
    assert engine.backend.cudnn_shapes["layer2.0.conv1"] == {shape}
    assert fastres.optimize(model, **options, tune=False).backend.tuned == {}
    with pytest.raises(fastres.ConfigError, match="tune must be"):
        fastres.optimize(model, **options, tune="always")


def test_tune_clear_removes_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    cache = TuneCache(torch.device("cpu"))
    cache.update(layers={"convA@b1": _entry()})
    assert main(["tune", "--clear"]) == 0
    assert "removed 2 tuning cache files" in capsys.readouterr().out  # the JSON and its lock
    assert not list(tmp_path.glob("tuning-*")) and cache.tactics() == {}


def test_bench_adds_rules_and_tuned_rows_when_the_cache_has_this_plan(tmp_path, monkeypatch):
    from fastres.tools.bench import BenchConfig, tuned_candidates

    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    model = calibrated("resnet18", 7)
    options = dict(device="cpu", dtype=torch.float32, backend="triton", self_check=False)
    engine = fastres.optimize(model, **options)
    config = BenchConfig("resnet18", batches=[2], image_size=32)
    assert tuned_candidates(config, engine, model, engine.device, engine.dtype) == []  # nothing cached
    signature, _ = engine.backend.conv_inputs(2, 32, 32)["layer1.0.conv1"]
    TuneCache(torch.device("cpu")).update(layers={f"{signature}@b2": _entry(CUDNN_TACTIC)})
    engine = fastres.optimize(model, **options)
    rows = tuned_candidates(config, engine, model, engine.device, engine.dtype)
    assert [c.name for c in rows] == ["fastres (rules)", "fastres (tuned)"]
    assert rows[0].fn.backend.tuned == {} and rows[1].fn is engine
    other = BenchConfig("resnet18", batches=[64], image_size=32)  # another bucket: no tuned row
    assert tuned_candidates(other, engine, model, engine.device, engine.dtype) == []


def test_the_device_key_follows_the_kernels_source(tmp_path, monkeypatch):
    """A development tree keeps its version number across kernel changes: a verdict or choice made on
    the old kernels must not be read for the new ones (a new file, not a stale hit)."""
    from fastres.tuning import cache as cache_module

    before = cache_module.device_key(torch.device("cpu"))
    assert before["kernels"] == cache_module.kernels_source_hash() and len(before["kernels"]) == 16
    monkeypatch.setattr(cache_module, "kernels_source_hash", lambda: "0" * 16)  # as if a kernel changed
    after = cache_module.device_key(torch.device("cpu"))
    assert after["kernels"] != before["kernels"]
    paths = {TuneCache(torch.device("cpu"), root=tmp_path, key=k).path for k in (before, after)}
    assert len(paths) == 2
