"""Tuned and verified on the GPU it runs on: per-layer tactic selection, a parity gate, a cache, a self-check.

candidates.py (what to try per conv), gate.py (parity against cuDNN), timing.py (CUDA events, median),
tuner.py (selection within a budget, the whole-network check), cache.py (JSON on disk, per device key),
selfcheck.py (first use on a GPU), use.py (what fastres.load and the engine call), report.py (the CLI's
table). Kept import-free here: the Triton backend imports tactics.py from this package.
"""
