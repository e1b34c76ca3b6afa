"""Class names for predictions: ImageNet-1k's for 1000-class models, or the user's own."""

from __future__ import annotations

import functools
import os
from importlib import resources

from .errors import InputError


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the index order of torchvision's published weights."""
    text = resources.files("fastres").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == 1000, f"packaged ImageNet class list has {len(names)} names"
    return names


def __getattr__(name: str):
    if name == "IMAGENET_CATEGORIES":  # read from the package data on first use only
        return list(imagenet_categories())
    raise AttributeError(name)


def load_labels(source, num_classes: int) -> list[str]:
    """Names for a head with `num_classes` outputs.

    source: None (ImageNet-1k's names for 1000 classes, else "class 0" ... "class N-1"), a list of
    names, or a path to a UTF-8 text file with one name per line (blank lines at the end ignored).
    """
    if source is None:
        if num_classes == 1000:
            return list(imagenet_categories())
        return [f"class {i}" for i in range(num_classes)]
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as f:
                names = f.read().splitlines()
        except OSError as e:
            raise InputError(f"cannot read labels file {path!r}: {e.strerror or e}") from None
        while names and not names[-1].strip():
            names.pop()
        names = [n.strip() for n in names]
        where = f"labels file {path!r}"
    else:
        try:
            names = [str(n) for n in source]
        except TypeError:
            raise InputError(
                f"labels must be a list of names or a path to a text file, got {type(source).__name__}"
            ) from None
        where = "labels"
    if len(names) != num_classes:
        raise InputError(
            f"{where} has {len(names)} names but the model has {num_classes} classes; "
            "give exactly one name per class, in class-index order"
        )
    return names
