"""The zig-zag schedule as data: order, prefetch offsets, slot alternation."""

from __future__ import annotations

import pytest

from flexgen_core.runtime.schedule import prologue, zigzag


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
