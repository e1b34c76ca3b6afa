"""How tuned choices are keyed: a layer signature (tactics.layer_signature) and a batch bucket."""

from __future__ import annotations


def batch_bucket(batch: int) -> int:
    """The batch sizes one tuned choice serves: the next power of two (5..8 use what batch 8 chose)."""
    return 1 << max(0, batch - 1).bit_length()


def entry_key(signature: str, bucket: int) -> str:
    return f"{signature}@b{bucket}"
