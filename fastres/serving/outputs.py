"""What a served engine answers: its Open Inference Protocol outputs, and what a request makes it run.

- A classifier answers `logits` (the default), top-k `labels` and `probs`, and on request `embedding`:
  the float32 N x D globally pooled feature (Engine.embed). A request that lists `embedding` runs the
  network up to the pool only, and takes its logits (when it asks for them too) from that embedding
  through the fc in float32: one forward. A second forward for the logits would double the request's
  cost, where the fc is D x classes multiply-adds per image (2 M for resnet50, against its 4 G).
  Those logits are the embedding's own (logits = embedding @ fc.T + b exactly); they differ from a
  logits-only request's by rounding only, as the fused head's float order differs.
- An embedder (`num_classes=0`, `fastres serve --num-classes 0`) answers `embedding` only.
- A feature engine (`features=`, `fastres serve --features layer1,layer4`) answers its layers by name
  (`stem`, `layer1`..`layer4`, `pool`), N x C x H x W (`pool`: N x D); every one unless the request
  lists some. One engine call computes them all; a request gets what it lists.

Every output but `labels` is FP32, whatever the engine's dtype: the client reads one datatype.
No Ray here: the metadata and the choice of what to run are tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import OUTPUT_NAMES, classifier_outputs

EMBEDDING = "embedding"
_LOGITS_DERIVED = frozenset(OUTPUT_NAMES)  # logits, and labels and probs computed from them

# What one engine call computes (part of the batcher's grouping key: calls of one kind only merge).
RUN_LOGITS = "logits"  # the classifier as it is
RUN_EMBEDDING = "embedding"  # up to the pool
RUN_BOTH = "embedding+logits"  # up to the pool, logits from it through the fc
RUN_ALL = "all"  # an embedder's or a feature engine's outputs


@dataclass(frozen=True)
class ServedOutputs:
    """The outputs of one served engine: for GET /v2/models/NAME and for parsing infer requests."""

    metadata: tuple[dict, ...]  # {"name", "datatype", "shape"}, -1 for the batch and dynamic sizes
    default: tuple[str, ...]  # what a request that lists no outputs gets
    classifier: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m["name"] for m in self.metadata)

    def run_for(self, requested) -> str:
        """What the engine must compute for a request that asked for the outputs `requested`."""
        requested = set(requested)
        if not self.classifier:
            return RUN_ALL
        if EMBEDDING not in requested:
            return RUN_LOGITS
        return RUN_BOTH if requested & _LOGITS_DERIVED else RUN_EMBEDDING


def served_outputs(engine) -> ServedOutputs:
    """The outputs `fastres serve` offers for `engine` (a classifier, an embedder or a feature engine)."""
    width = engine.architecture.spec.feature_channels
    embedding = {"name": EMBEDDING, "datatype": "FP32", "shape": [-1, width]}
    if engine.plan.outputs is None:
        metadata = (*classifier_outputs(engine.num_classes), embedding)
        return ServedOutputs(metadata, ("logits",), classifier=True)
    if engine.embedding:
        return ServedOutputs((embedding,), (EMBEDDING,), classifier=False)
    # Channels do not depend on the image size; the spatial dims do (and on the stride or dilation).
    shapes = engine.output_shapes(1, 64, 64)
    metadata = tuple(
        {"name": name, "datatype": "FP32", "shape": [-1, shape[1], *[-1] * (len(shape) - 2)]}
        for name, shape in shapes.items()
    )
    return ServedOutputs(metadata, tuple(shapes), classifier=False)
