"""The zig-zag block schedule (FlexGen Algorithm 1) as data.

For a block of `num_batches` GPU batches, the steps run token by token, layer by layer, and inside a
layer over the GPU batches, so a layer's weights are loaded once per token and reused by every batch.
Each step names what to prefetch while it computes: the next layer's weights (issued at the layer's
first batch, into the other of two weight slots) and the inputs (KV cache prefix, activations) of the
next step. All index wrap-around lives here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    token: int
    layer: int
    batch: int
    weight_slot: int  # device slot holding this layer's weights
    last_batch: bool  # last use of this layer's weights in this token: release the slot after it
    prefetch_layer: int | None  # layer whose weights start loading during this step
    next_step: tuple[int, int, int] | None  # (token, layer, batch) whose inputs start loading now


def weight_slot(token: int, layer: int, num_layers: int) -> int:
    return (token * num_layers + layer) % 2


def zigzag(num_tokens: int, num_layers: int, num_batches: int) -> Iterator[Step]:
    """Steps of one block: token -> layer -> GPU batch."""
    if min(num_tokens, num_layers, num_batches) < 1:
        raise ValueError("num_tokens, num_layers and num_batches must be >= 1")
    for i in range(num_tokens):
        for j in range(num_layers):
            has_next_layer = j + 1 < num_layers or i + 1 < num_tokens
            for k in range(num_batches):
                if k + 1 < num_batches:
                    nxt: tuple[int, int, int] | None = (i, j, k + 1)
                elif j + 1 < num_layers:
                    nxt = (i, j + 1, 0)
                elif i + 1 < num_tokens:
                    nxt = (i + 1, 0, 0)
                else:
                    nxt = None
                prefetch = None
                if k == 0 and has_next_layer:
                    prefetch = (j + 1) % num_layers
                yield Step(i, j, k, weight_slot(i, j, num_layers), k == num_batches - 1, prefetch, nxt)
