"""Progress for long loops (classify, compile reports, benchmarks): tqdm when installed (the `progress`
extra), else a plain counter on stderr; nothing at all when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self._bar = None
        self._last = 0.0
        self.enabled = enabled and sys.stderr.isatty()  # no bar redraws in logs and captured output
        if self.enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last > 0.5 or self.done >= self.total:
            self._last = time.monotonic()
            print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)
