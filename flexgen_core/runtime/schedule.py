"""The zig-zag block schedule (FlexGen Algorithm 1) as data.

For a block of `num_batches` GPU batches, the steps run token by token, layer by layer, and inside a
layer over the GPU batches, so a layer's weights are loaded once per token and reused by every batch.
Weights stream through `slots` device slots used round robin; at a layer's first batch the schedule asks
for the next `slots - 1` layers' weights (each into its own slot, issued as soon as that slot's previous
layer is done), so with three slots the weights two layers ahead load while a long layer step (CPU-delegated
attention, a blocking disk read) runs. Each step also names the next step, whose inputs (KV cache prefix,
activations) load while it computes. All index wrap-around lives here.
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
    prefetch: tuple[tuple[int, int], ...]  # (layer, slot) whose weights start loading during this step
    next_step: tuple[int, int, int] | None  # (token, layer, batch) whose inputs start loading now


def weight_slot(token: int, layer: int, num_layers: int, slots: int = 2) -> int:
    return (token * num_layers + layer) % slots


def prologue(num_tokens: int, num_layers: int, slots: int = 2) -> tuple[tuple[int, int], ...]:
    """(layer, slot) of token 0 to request before the first step: the first `slots - 1` layers."""
    total = num_tokens * num_layers
    return tuple((g % num_layers, g % slots) for g in range(min(slots - 1, total)))


def zigzag(num_tokens: int, num_layers: int, num_batches: int, slots: int = 2) -> Iterator[Step]:
    """Steps of one block: token -> layer -> GPU batch."""
    if min(num_tokens, num_layers, num_batches) < 1 or slots < 2:
        raise ValueError("num_tokens, num_layers and num_batches must be >= 1, slots >= 2")
    total = num_tokens * num_layers
    for i in range(num_tokens):
        for j in range(num_layers):
            g = i * num_layers + j  # global layer-step index
            ahead = tuple(((g + d) % num_layers, (g + d) % slots) for d in range(1, slots) if g + d < total)
            for k in range(num_batches):
                if k + 1 < num_batches:
                    nxt: tuple[int, int, int] | None = (i, j, k + 1)
                elif j + 1 < num_layers:
                    nxt = (i, j + 1, 0)
                elif i + 1 < num_tokens:
                    nxt = (i + 1, 0, 0)
                else:
                    nxt = None
                yield Step(i, j, k, g % slots, k == num_batches - 1, ahead if k == 0 else (), nxt)


def stage_round(token: int, round_index: int, num_layers: int, num_batches: int, slots: int = 2) -> Iterator[Step]:
    """Steps of one pipeline round: one micro-batch of `num_batches` GPU batches through a stage's `num_layers`
    layers (local indices 0..num_layers-1) for token `token`.

    Rounds follow each other on a stage (the next one runs the same layers for another micro-batch), so slot
    use continues across rounds (`round_index` counts the rounds the stage ran in this block) and the weights
    of the next round's first layers are requested during this round's last ones. Inputs are prefetched
    within the round only: the next round's inputs arrive by message.
    """
    if min(num_layers, num_batches) < 1 or slots < 2 or round_index < 0:
        raise ValueError("num_layers and num_batches must be >= 1, slots >= 2, round_index >= 0")
    for j in range(num_layers):
        g = round_index * num_layers + j
        ahead = tuple(((g + d) % num_layers, (g + d) % slots) for d in range(1, slots))
        for k in range(num_batches):
            if k + 1 < num_batches:
                nxt: tuple[int, int, int] | None = (token, j, k + 1)
            else:
                nxt = (token, j + 1, 0) if j + 1 < num_layers else None
            yield Step(token, j, k, g % slots, k == num_batches - 1, ahead if k == 0 else (), nxt)
