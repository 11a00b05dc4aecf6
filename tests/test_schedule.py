"""The zig-zag schedule as data: order, prefetch offsets, slot alternation."""

from __future__ import annotations

import pytest

from flexgen_core.runtime.schedule import zigzag


@pytest.mark.parametrize("n, layers, batches", [(1, 1, 1), (3, 4, 1), (2, 5, 3), (4, 6, 4)])
def test_every_step_once_in_zigzag_order(n: int, layers: int, batches: int) -> None:
    steps = list(zigzag(n, layers, batches))
    assert [(s.token, s.layer, s.batch) for s in steps] == [
        (i, j, k) for i in range(n) for j in range(layers) for k in range(batches)]


def test_prefetches_come_before_use_and_alternate_slots() -> None:
    n, layers, batches = 3, 5, 3
    steps = list(zigzag(n, layers, batches))
    loaded = {(0, 0): 0}  # prologue: layer 0 of token 0 in slot 0
    for pos, s in enumerate(steps):
        assert loaded.get((s.token, s.layer)) == s.weight_slot, "weights must be prefetched into the step's slot"
        if s.prefetch_layer is not None:
            assert s.batch == 0
            nxt = steps[pos + batches]  # first step of the next layer
            assert nxt.layer == s.prefetch_layer and nxt.weight_slot == 1 - s.weight_slot
            loaded[(nxt.token, nxt.layer)] = nxt.weight_slot
        if pos + 1 < len(steps):
            nxt = steps[pos + 1]
            assert s.next_step == (nxt.token, nxt.layer, nxt.batch)
        else:
            assert s.next_step is None and s.prefetch_layer is None
        assert s.last_batch == (s.batch == batches - 1)


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError):
        list(zigzag(0, 3, 1))
