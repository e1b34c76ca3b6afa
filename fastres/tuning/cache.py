"""The tuning cache: tuned tactics and self-check verdicts as JSON on disk, one file per device key.

Where: `$FASTRES_CACHE` (default `~/.cache/fastres`), file `tuning-<hash>.json`, the hash taken over
the device key: GPU name, SM count, compute capability, driver, CUDA, torch, Triton and fastres
versions, and a hash of the kernels' source (a development tree's version number stays the same across
kernel changes, and a verdict on the old kernels says nothing of the new). A new driver, Triton or
kernel gives a new file, so a choice measured (or verified) on other
software is never read. Inside, entries are keyed by layer signature and batch bucket.

Robustness: a file that is empty, truncated, not JSON, of another format version (stale) or whose
recorded key is not this device's (foreign, e.g. copied from another machine) gives a `CacheWarning`,
is ignored and rewritten; nothing in it can crash a load. Writes are read-merge-write under an
exclusive `flock` on a lock file, then a temp file in the same folder and `os.replace`, so readers
never see a half-written file and concurrent writers (Ray Serve replicas on one node) lose no entry.
A folder that cannot be written warns once per call and the caller runs untuned.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .keys import batch_bucket, entry_key  # noqa: F401  (re-exported for callers)

FORMAT = 1


class CacheWarning(UserWarning):
    """The tuning cache could not be read or written; fastres runs on (untuned, or retuning)."""


def cache_root() -> Path:
    return Path(os.environ.get("FASTRES_CACHE") or Path.home() / ".cache" / "fastres")


@functools.cache
def _driver_version() -> str | None:
    from ..tools.environment import _run

    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


@functools.cache
def kernels_source_hash() -> str:
    """The kernels' source and the tactics that run them: what a tuned choice or verdict measured."""
    from .. import kernels
    from . import tactics

    digest = hashlib.sha256()
    files = sorted(Path(kernels.__file__).parent.glob("*.py")) + [Path(tactics.__file__)]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def device_key(device: torch.device) -> dict:
    """What a tuned choice or a self-check verdict is only valid for."""
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    key = {
        "torch": torch.__version__,
        "triton": triton_version,
        "fastres": __version__,
        "kernels": kernels_source_hash(),
    }
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
            cuda=torch.version.cuda,
        )
    else:
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        key.update(
            gpu="cpu (Triton interpreter)" if interpreted else "cpu",
            sm_count=0,
            capability=None,
            driver=None,
            cuda=None,
        )
    return key


def _empty() -> dict:
    return {"layers": {}, "self_check": {}}


class TuneCache:
    def __init__(self, device: torch.device, root: Path | str | None = None, key: dict | None = None):
        self.root = Path(root) if root is not None else cache_root()
        self.key = key if key is not None else device_key(device)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.root / f"tuning-{digest}.json"
        self._lock_path = self.root / f"tuning-{digest}.lock"

    # ---------------------------------------------------------------------------------------- reading

    def read(self, repair: bool = True) -> dict:
        """{"layers": {entry key: entry}, "self_check": {...}}; {} parts when absent or unusable.

        repair: rewrite an unusable file with what could be kept, so the warning is given once."""
        data, problem = self._parse()
        if problem:
            warnings.warn(
                f"tuning cache {self.path}: {problem}; ignored, rewritten", CacheWarning, stacklevel=3
            )
            if repair:
                self._write_locked(lambda current: None)
        return data

    def _parse(self) -> tuple[dict, str | None]:
        try:
            raw = self.path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # nothing cached (yet): quiet
            return _empty(), None
        except OSError as exc:
            return _empty(), f"cannot be read ({exc})"
        if not raw.strip():
            return _empty(), "empty file"
        try:
            data = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _empty(), f"corrupt or truncated JSON ({exc})"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return _empty(), f"stale or unknown format (want format {FORMAT})"
        if data.get("key") != self.key:
            return _empty(), "foreign: recorded for another GPU or software versions"
        layers, checks = data.get("layers"), data.get("self_check")
        if not isinstance(layers, dict) or not isinstance(checks, dict):
            return _empty(), "malformed entries"
        good = {k: v for k, v in layers.items() if _valid_entry(k, v)}
        problem = None if len(good) == len(layers) else f"{len(layers) - len(good)} malformed entries dropped"
        return {
            "layers": good,
            "self_check": {k: v for k, v in checks.items() if isinstance(v, dict)},
        }, problem

    def tactics(self) -> dict:
        """{(signature, bucket): Tactic} of every valid layer entry."""
        from .tactics import Tactic

        out = {}
        for name, entry in self.read()["layers"].items():
            signature, _, bucket = name.rpartition("@b")
            out[(signature, int(bucket))] = Tactic.from_json(entry["tactic"])
        return out

    def verdict(self, plan_key: str) -> dict | None:
        return self.read()["self_check"].get(plan_key)

    # ---------------------------------------------------------------------------------------- writing

    def update(self, layers: dict | None = None, self_check: dict | None = None) -> bool:
        """Merge entries into the file; False (with a CacheWarning) when it cannot be written."""

        def merge(current: dict) -> None:
            current["layers"].update(layers or {})
            current["self_check"].update(self_check or {})

        return self._write_locked(merge)

    def _write_locked(self, merge) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._flock(self._lock_path):
                current, _ = self._parse()
                merge(current)
                self._replace({"format": FORMAT, "key": self.key, **current})
            return True
        except OSError as exc:
            warnings.warn(
                f"cannot write the tuning cache in {self.root} ({exc}); running untuned. Set FASTRES_CACHE "
                "to a writable folder to keep tuning results",
                CacheWarning,
                stacklevel=3,
            )
            return False

    def _replace(self, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tuning-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def writable(self) -> bool:
        """Whether tuning results could be kept here (probes with a temp file)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(tmp)
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def tuning_lock(self):
        """Held while one process tunes: another replica waits, then reads what the first cached."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._flock(self.root / (self.path.stem + ".tuning.lock")):
            yield

    @staticmethod
    @contextlib.contextmanager
    def _flock(path: Path):
        try:
            import fcntl
        except ImportError:  # Windows: atomic replace only (a concurrent writer may lose entries)
            yield
            return
        with open(path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _valid_entry(name, entry) -> bool:
    from .tactics import Tactic

    try:
        signature, at, bucket = name.rpartition("@b")
        if not (signature and at and bucket.isdigit()):
            return False
        Tactic.from_json(entry["tactic"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True


def clear(root: Path | str | None = None) -> list[Path]:
    """Remove every tuning file (and lock) under the cache folder; the removed paths."""
    root = Path(root) if root is not None else cache_root()
    removed = []
    for path in sorted(root.glob("tuning-*")) + sorted(root.glob(".tuning-*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
