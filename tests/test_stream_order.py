"""Stream-ordering rules that only a GPU would break, checked on the CPU by recording the engine's calls.

On CUDA, a device->host copy runs on a side stream after a compute-stream mark; the mark must come after
every kernel that writes the copy's source. (A mark taken between quantizing K and V let V's copy read
unwritten bytes: inf/NaN in the 4-bit KV cache on the H100, never on the CPU, where compute is synchronous.)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from flexgen_core import Engine, Policy
from flexgen_core.runtime.activations import ActivationStore
from flexgen_core.runtime.kv_cache import KVCache
from flexgen_core.runtime.transfer import Ticket, Transfer


@pytest.mark.parametrize("policy", [
    Policy(cache=(0.25, 0.75, 0), compress_cache=True, gpu_batch_size=4, num_gpu_batches=2),
    Policy(cache=(0, 0.5, 0.5), compress_cache=True, gpu_batch_size=4, num_gpu_batches=2),
    Policy(cache=(0, 1, 0), gpu_batch_size=4, num_gpu_batches=2),
], ids=["compressed-gpu-cpu", "compressed-cpu-disk", "dense-cpu"])
def test_cache_stores_are_marked_after_their_data_is_encoded(tiny_opt: Path, offload_dir: Path, policy: Policy,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, Any]] = []
    marks: dict[int, int] = {}  # id(ticket) -> index in log
    real_mark, real_encode = Transfer.mark, KVCache._encode
    real_copy, real_disk_store = Transfer.copy, KVCache._disk_store

    def mark(self: Transfer) -> Ticket:
        ticket = Ticket(parts=[real_mark(self)])  # a distinct object per mark
        marks[id(ticket)] = len(log)
        log.append(("mark", ticket))
        return ticket

    def encode(self: KVCache, *args: Any) -> Any:
        log.append(("encode", None))
        return real_encode(self, *args)

    def copy(self: Transfer, pairs: Any, after: Any = (), lane: str = "load") -> Ticket:
        if lane == "store":
            log.append(("store", [a for a in after if a is not None]))
        return real_copy(self, pairs, after, lane)

    def disk_store(self: KVCache, block: int, batch: int, kv: int, regions: Any, data: Any, mark: Ticket) -> Ticket:
        log.append(("store", [mark]))
        return real_disk_store(self, block, batch, kv, regions, data, mark)

    monkeypatch.setattr(Transfer, "mark", mark)
    monkeypatch.setattr(KVCache, "_encode", encode)
    monkeypatch.setattr(Transfer, "copy", copy)
    monkeypatch.setattr(KVCache, "_disk_store", disk_store)
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        engine.generate([[2, 5, 6, 7, 8]] * 8, 4)

    stores = [(i, after) for i, (kind, after) in enumerate(log) if kind == "store"]
    assert stores
    for i, after in stores:
        ordered_by = [marks[id(t)] for t in after if id(t) in marks]
        assert ordered_by, f"store at {i} is not ordered after any compute mark"
        last_mark = max(ordered_by)
        encodes_since = [j for j in range(last_mark, i) if log[j][0] == "encode"]
        assert not encodes_since, f"store at {i} may read data encoded after its mark (log {last_mark}..{i})"


def test_input_copies_do_not_queue_behind_bulk_loads() -> None:
    """A hidden state the next step reads must not wait for weights queued before it (one FIFO lane did)."""
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as gate:
        blocked = Ticket(future=gate.submit(lambda: release.wait() and None))
        transfer = Transfer(torch.device("cpu"), overlap=True)
        try:
            weights_dst, hidden_dst = torch.zeros(4), torch.zeros(4)
            bulk = transfer.copy([(weights_dst, torch.ones(4))], after=[blocked])
            hidden = transfer.copy([(hidden_dst, torch.full((4,), 2.0))], lane="input")
            assert hidden.future is not None and bulk.future is not None
            hidden.future.result(timeout=10)  # completes while the bulk load still waits
            assert not bulk.future.done()
            assert torch.equal(hidden_dst, torch.full((4,), 2.0))
            release.set()
            bulk.host_wait()
            assert torch.equal(weights_dst, torch.ones(4))
        finally:
            release.set()
            transfer.close()


def test_hidden_state_loads_use_the_input_lane(tiny_opt: Path, offload_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lanes: list[str] = []
    real_prefetch, real_copy = ActivationStore.prefetch, Transfer.copy
    inside = threading.local()

    def prefetch(self: ActivationStore, *args: Any) -> None:
        inside.on = True
        try:
            real_prefetch(self, *args)
        finally:
            inside.on = False

    def copy(self: Transfer, pairs: Any, after: Any = (), lane: str = "load") -> Ticket:
        if getattr(inside, "on", False):
            lanes.append(lane)
        return real_copy(self, pairs, after, lane)

    monkeypatch.setattr(ActivationStore, "prefetch", prefetch)
    monkeypatch.setattr(Transfer, "copy", copy)
    policy = Policy(weights=(0.5, 0.5, 0), acts=(0, 1, 0), gpu_batch_size=4, num_gpu_batches=2)
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        engine.generate([[2, 5, 6, 7, 8]] * 8, 3)
    assert lanes and set(lanes) == {"input"}


def test_delegated_attention_runs_on_its_thread_while_the_next_batch_starts(tiny_opt: Path, offload_dir: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU attention of GPU batch i runs on the host-attention thread; batch i+1's attention is issued before
    batch i's result is collected, and the next layer's first batch before this layer's last result
    (`paired_decode`), so the device computes while the host attends and the host never idles in between."""
    from flexgen_core.runtime import layers

    log: list[tuple[str, int]] = []
    threads: set[str] = set()
    real_begin, real_collect, real_host = KVCache.begin_decode, KVCache.collect, layers.host_decode_attention

    def begin(self: KVCache, block: int, batch: int, *args: Any) -> Any:
        log.append(("begin", batch))
        return real_begin(self, block, batch, *args)

    def collect(self: KVCache, job: Any) -> Any:
        log.append(("collect", job.key[0]))
        return real_collect(self, job)

    def host(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return real_host(*args, **kwargs)

    monkeypatch.setattr(KVCache, "begin_decode", begin)
    monkeypatch.setattr(KVCache, "collect", collect)
    monkeypatch.setattr(layers, "host_decode_attention", host)
    policy = Policy(2, 3, cache=(0, 1, 0), cpu_attention=True)
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        engine.generate([[2, 5, 6, 7, 8]] * 6, 3)
        assert engine.last_stats.host_attention_s["compute"] > 0
    assert threads and all(name.startswith("flexgen-attention") for name in threads)
    first_layer = log[:7]  # the first decode token's first attention layer (3 GPU batches), then the next one
    assert first_layer == [("begin", 0), ("begin", 1), ("collect", 0), ("begin", 2), ("collect", 1),
                           ("begin", 0), ("collect", 2)]


def test_step_ranges_are_named_only_under_a_profiler(tiny_opt: Path, offload_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--torch-profile` traces name every schedule step and the wait for host attention; without a profiler
    the engine opens no range (each costs about 5 us of host time per step, which small-batch decode pays)."""
    from torch.profiler import profile

    from flexgen_core.runtime import engine as engine_module
    from flexgen_core.runtime import kv_cache as kv_cache_module

    opened: list[str] = []
    real_range = engine_module.record_function

    def tracked(name: str) -> Any:
        opened.append(name)
        return real_range(name)

    monkeypatch.setattr(engine_module, "record_function", tracked)
    monkeypatch.setattr(kv_cache_module, "record_function", tracked)
    policy = Policy(2, 2, cache=(0, 1, 0), cpu_attention=True)
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        engine.generate([[2, 5, 6, 7, 8]] * 4, 3)
        assert opened == []
        with profile() as prof:
            engine.generate([[2, 5, 6, 7, 8]] * 4, 3)
    names = {event.name for event in prof.events()}
    assert any(name.startswith("flexgen::step t1 ") for name in names)
    assert "flexgen::host_attention.wait" in names
    assert opened
