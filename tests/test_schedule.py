"""The zig-zag schedule as data: order, prefetch offsets, slot alternation."""

from __future__ import annotations

import pytest

from flexgen_core.runtime.schedule import paired_decode, prologue, zigzag


@pytest.mark.parametrize("n, layers, batches", [(1, 1, 1), (3, 4, 1), (2, 5, 3), (4, 6, 4)])
def test_every_step_once_in_zigzag_order(n: int, layers: int, batches: int) -> None:
    steps = list(zigzag(n, layers, batches))
    assert [(s.token, s.layer, s.batch) for s in steps] == [
        (i, j, k) for i in range(n) for j in range(layers) for k in range(batches)]


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_prefetches_come_before_use_and_rotate_slots(slots: int) -> None:
    n, layers, batches = 3, 5, 3
    steps = list(zigzag(n, layers, batches, slots))
    loaded = {(0, layer): slot for layer, slot in prologue(n, layers, slots)}
    in_slot: dict[int, tuple[int, int]] = {}
    for pos, s in enumerate(steps):
        assert loaded.get((s.token, s.layer)) == s.weight_slot, "weights must be requested into the step's slot"
        in_slot[s.weight_slot] = (s.token, s.layer)
        for layer, slot in s.prefetch:
            assert s.batch == 0
            # the slot requested is not the one this step computes from, and the request looks at most
            # `slots - 1` layer steps ahead
            assert slot != s.weight_slot
            g = s.token * layers + s.layer
            target = next(x for x in steps[pos:] if x.layer == layer and x.weight_slot == slot)
            assert 0 < target.token * layers + target.layer - g < slots
            loaded[(target.token, target.layer)] = slot
        if pos + 1 < len(steps):
            nxt = steps[pos + 1]
            assert s.next_step == (nxt.token, nxt.layer, nxt.batch)
        else:
            assert s.next_step is None and s.prefetch == ()
        assert s.last_batch == (s.batch == batches - 1)


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError):
        list(zigzag(0, 3, 1))


def _check_slots(steps: list, layers: int, slots: int, prologue_requests: list[tuple[int, int]] = ()) -> None:
    """Replay the weight slots: a layer is requested into a slot only after the slot's previous layer was
    released, materialized at its first step, and every step reads its own layer from its slot."""
    occupant: dict[int, int | None] = {s: None for s in range(slots)}  # slot -> global layer index
    requested: dict[int, int] = {}  # slot -> global layer index requested into it
    released: set[int] = set()
    for layer, slot in prologue_requests:
        requested[slot] = layer
    token_of_next = 0
    for s in steps:
        g = s.token * layers + s.layer
        for layer, slot in s.prefetch:
            prev = occupant[slot]
            assert prev is None or prev in released, f"slot {slot} requested for layer {layer} while in use"
            # the request is for the next occurrence of `layer` that uses this slot
            requested[slot] = min(h for h in range(token_of_next * layers, len(steps) * layers)
                                  if h % layers == layer and h % slots == slot and h not in released
                                  and h != prev)
        if s.materialize:
            assert requested.get(s.weight_slot) == g, f"layer {g} materialized without a request"
            occupant[s.weight_slot] = g
        assert occupant[s.weight_slot] == g, "a step must read its own layer's weights"
        for slot in s.release:
            released.add(occupant[slot])
        token_of_next = s.token


@pytest.mark.parametrize("n, layers, batches", [(1, 6, 2), (3, 6, 2), (3, 8, 3), (2, 4, 4)])
def test_paired_decode_order_respects_dependencies_and_slots(n: int, layers: int, batches: int) -> None:
    steps = list(paired_decode(n, layers, batches, 3))
    keys = [(s.token, s.layer, s.batch) for s in steps]
    assert sorted(keys) == [(i, j, k) for i in range(n) for j in range(layers) for k in range(batches)]
    assert keys[:layers * batches] == [(0, j, k) for j in range(layers) for k in range(batches)]  # prefill
    pos = {key: p for p, key in enumerate(keys)}
    for i in range(n):
        for j in range(1, layers):
            for k in range(batches):  # each step after the one that produces its input
                assert pos[(i, j, k)] > pos[(i, j - 1, k)]
        if i:
            for k in range(batches):
                assert pos[(i, 0, k)] > pos[(i - 1, layers - 1, k)]
    for i in range(1, n):  # the next attention layer's first batch is issued before this one's last MLP step
        for a in range(1, layers - 3, 2):
            assert pos[(i, a + 2, 0)] < pos[(i, a + 1, batches - 1)]
    for p, s in enumerate(steps):
        assert s.next_step == (keys[p + 1] if p + 1 < len(keys) else None)
    _check_slots(steps, layers, 3)
    # an attention layer's weights stay until the MLP step of its last batch (its output projection)
    for s in steps:
        if s.token and s.layer % 2 == 1 and s.layer < layers - 1:
            release_at = next(p for p, x in enumerate(steps) if s.weight_slot in x.release and p >= pos[keys[0]]
                              and p >= pos[(s.token, s.layer, batches - 1)])
            assert release_at >= pos[(s.token, s.layer + 1, batches - 1)]


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_zigzag_slots_replay(slots: int) -> None:
    n, layers, batches = 3, 5, 3
    _check_slots(list(zigzag(n, layers, batches, slots)), layers, slots, list(prologue(n, layers, slots)))


def test_paired_decode_refuses_what_it_cannot_order() -> None:
    for args in [(2, 6, 1, 3), (2, 6, 2, 2), (2, 5, 2, 3)]:
        with pytest.raises(ValueError):
            list(paired_decode(*args))
