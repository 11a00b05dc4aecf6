"""The zig-zag block schedule (FlexGen Algorithm 1) as data.

For a block of `num_batches` GPU batches, the steps run token by token, layer by layer, and inside a
layer over the GPU batches, so a layer's weights are loaded once per token and reused by every batch.
Weights stream through `slots` device slots used round robin; at a layer's first batch the schedule asks
for the next `slots - 1` layers' weights (each into its own slot, issued as soon as that slot's previous
layer is done), so with three slots the weights two layers ahead load while a long layer step (CPU-delegated
attention, a blocking disk read) runs. Each step also names the next step, whose inputs (KV cache prefix,
activations) load while it computes. With CPU-delegated attention, `paired_decode` reorders decode so the
host's attention thread never waits at a layer boundary. All index wrap-around lives here.
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
    last_batch: bool  # last GPU batch of this layer in this token
    prefetch: tuple[tuple[int, int], ...]  # (layer, slot) whose weights start loading during this step
    next_step: tuple[int, int, int] | None  # (token, layer, batch) whose inputs start loading now
    materialize: bool = False  # first step of this layer in this token: its weights are needed from now on
    release: tuple[int, ...] = ()  # slots whose weights are no longer needed after this step


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
                last = k == num_batches - 1
                yield Step(i, j, k, g % slots, last, ahead if k == 0 else (), nxt, k == 0, (g % slots,) if last else ())


def paired_decode(num_tokens: int, num_layers: int, num_batches: int, slots: int = 3) -> Iterator[Step]:
    """Steps of one block for a model laid out [embed, (attention, MLP) x P, head] whose decode attention runs
    on the host while the device goes on (CPU delegation). Prefill is `zigzag`; each decode token runs the
    embed layer, then the pairs as a software pipeline over (pair, GPU batch) units, then the head:

        A(p,0), A(p,1), M(p,0), A(p,2), M(p,1), ..., A(p+1,0), M(p,K-1), A(p+1,1), M(p+1,0), ...

    so the attention of GPU batch k is issued before the host is waited on for batch k-1, and the next pair's
    first attention (it needs only M(p,0)) is issued before the host is waited on for this pair's last batch:
    the host never idles at a layer boundary. An attention layer's weights are needed until the MLP step
    of its last batch (its output projection runs when the host's result is collected); three layers are live
    at a pair boundary, so this takes `slots` >= 3. Weights load into the slot that the layer `slots` steps
    earlier released, requested right after that release.
    """
    if num_tokens < 1 or num_layers < 2 or num_layers % 2 or num_batches < 2 or slots < 3:
        raise ValueError("paired_decode needs num_tokens >= 1, an even layer count (embed, pairs, head), "
                         "num_batches >= 2 (with one, each step needs the previous one's output) and slots >= 3")
    pairs = (num_layers - 2) // 2
    order: list[tuple[int, int, int]] = []
    last_use: dict[int, int] = {}  # global layer index -> position of the last step that needs its weights
    for i in range(num_tokens):
        if i == 0:
            order += [(0, j, k) for j in range(num_layers) for k in range(num_batches)]
            continue
        order += [(i, 0, k) for k in range(num_batches)]
        units = [(p, k) for p in range(pairs) for k in range(num_batches)]
        for n, (p, k) in enumerate(units):
            order.append((i, 1 + 2 * p, k))
            if n:
                prev_p, prev_k = units[n - 1]
                order.append((i, 2 + 2 * prev_p, prev_k))
                if prev_k == num_batches - 1:  # the attention's output projection runs before this MLP step
                    last_use[i * num_layers + 1 + 2 * prev_p] = len(order) - 1
        if units:
            p, k = units[-1]
            order.append((i, 2 + 2 * p, k))
            last_use[i * num_layers + 1 + 2 * p] = len(order) - 1
        order += [(i, num_layers - 1, k) for k in range(num_batches)]
    first_use: dict[int, int] = {}
    for pos, (i, j, _) in enumerate(order):
        g = i * num_layers + j
        first_use.setdefault(g, pos)
        last_use[g] = max(last_use.get(g, pos), pos)
    total = num_tokens * num_layers
    releases: dict[int, list[int]] = {}
    requests: dict[int, list[int]] = {0: [g for g in range(min(slots, total))]}
    for g, pos in last_use.items():
        releases.setdefault(pos, []).append(g)
        if g + slots < total:
            requests.setdefault(pos + 1, []).append(g + slots)
    for pos, (i, j, k) in enumerate(order):
        g = i * num_layers + j
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        prefetch = tuple((h % num_layers, h % slots) for h in sorted(requests.get(pos, [])))
        yield Step(i, j, k, g % slots, k == num_batches - 1, prefetch, nxt, first_use[g] == pos,
                   tuple(h % slots for h in sorted(releases.get(pos, []))))


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
            last = k == num_batches - 1
            yield Step(token, j, k, g % slots, last, ahead if k == 0 else (), nxt, k == 0, (g % slots,) if last else ())
