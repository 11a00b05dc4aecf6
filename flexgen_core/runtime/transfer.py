"""Asynchronous copies between tiers, with one completion `Ticket` per copy.

On CUDA, host<->device copies run on three side streams and complete with CUDA events: bulk loads (weights,
streamed cache), stores, and inputs (the hidden states the next step reads). Inputs have their own stream so
a few hundred KB never queue behind a layer's weights: in one FIFO stream, each GPU batch's hidden state
waited for the weights of the layer two ahead, which serialized CPU attention with the weight transfer.
`Ticket.wait()` makes the compute stream wait for that copy only (never a device-wide sync). Disk
reads and writes run on background threads (positional file I/O into pinned staging, then an async
copy on the thread's own stream). With the CPU as compute device the same calls run on a background
copy thread (overlap) or inline (no overlap), so every path of the schedule is exercised without a GPU.

The transfer engine never decides where data goes; callers pass destination and source views.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from flexgen_core.runtime.memory import DiskArena


class Ticket:
    """Completion handle of an asynchronous operation (a CUDA event and/or a host future)."""

    __slots__ = ("event", "future", "parts")

    def __init__(self, event: torch.cuda.Event | None = None, future: Future | None = None,
                 parts: Sequence[Ticket] = ()) -> None:
        self.event = event
        self.future = future
        self.parts = tuple(parts)

    @staticmethod
    def all(tickets: Iterable[Ticket | None]) -> Ticket:
        return Ticket(parts=[t for t in tickets if t is not None])

    def _event(self) -> torch.cuda.Event | None:
        if self.future is not None:
            result = self.future.result()  # re-raises an I/O error from the worker thread
            if result is not None:
                return result
        return self.event

    def stream_wait(self, stream: torch.cuda.Stream | None) -> None:
        """Make `stream` (None: host only) wait for this operation."""
        for p in self.parts:
            p.stream_wait(stream)
        event = self._event()
        if event is not None:
            if stream is None:
                event.synchronize()
            else:
                stream.wait_event(event)

    def wait(self) -> None:
        """Order later work on the compute stream after this operation (host waits only for threads)."""
        self.stream_wait(torch.cuda.current_stream() if torch.cuda.is_available() and self._has_event() else None)

    def host_wait(self) -> None:
        """Block the calling thread until the operation has completed."""
        self.stream_wait(None)

    def _has_event(self) -> bool:
        return self.event is not None or self.future is not None or any(p._has_event() for p in self.parts)


DONE = Ticket()

Lane = Literal["load", "store", "input"]  # bulk host->device, device->host, latency-critical host->device


class Transfer:
    """Copies between compute device, host and disk (see module docstring)."""

    def __init__(self, device: torch.device, overlap: bool, disk_threads: int = 2) -> None:
        self.device = device
        self.overlap = overlap
        self.cuda = device.type == "cuda"
        self._disk_pool = ThreadPoolExecutor(max_workers=disk_threads, thread_name_prefix="flexgen-disk")
        host_lanes = overlap and not self.cuda  # on the CPU, each lane is one background thread
        self._copy_pools: dict[str, ThreadPoolExecutor] = {
            lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flexgen-{lane}")
            for lane in (("load", "input") if host_lanes else ())}
        self._local = threading.local()
        self._pending: list[Future] = []
        if self.cuda:
            self.load_stream = torch.cuda.Stream(device) if overlap else torch.cuda.current_stream(device)
            self.store_stream = torch.cuda.Stream(device) if overlap else torch.cuda.current_stream(device)
            self.input_stream = torch.cuda.Stream(device) if overlap else torch.cuda.current_stream(device)
            self._streams = {"load": self.load_stream, "store": self.store_stream, "input": self.input_stream}

    # ---- compute-stream marks ---------------------------------------------------------------
    def mark(self) -> Ticket:
        """A ticket that completes when all compute issued so far has completed."""
        if not self.cuda:
            return DONE
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return Ticket(event=ev)

    # ---- host <-> device ----------------------------------------------------------------------
    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], after: Iterable[Ticket] = (),
             lane: Lane = "load") -> Ticket:
        """Copy each (dst, src) pair, after the `after` tickets, on `lane`'s stream."""
        after = [t for t in after if t is not None]
        if not pairs:
            return Ticket.all(after)
        if self.cuda:
            stream = self._streams[lane]
            for t in after:
                t.stream_wait(stream)
            with torch.cuda.stream(stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                    if src.is_cuda and stream is not torch.cuda.default_stream(self.device):
                        src.record_stream(stream)
                ev = torch.cuda.Event()
                ev.record(stream)
            return Ticket(event=ev)
        pool = self._copy_pools.get("input" if lane == "input" else "load")  # stores share the load thread
        return self._run_host(lambda: _copy_all(pairs), after, pool=pool)

    # ---- disk ---------------------------------------------------------------------------------
    def disk_read(self, reads: Sequence[tuple[DiskArena, int, torch.Tensor]],
                  then: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), after: Iterable[Ticket] = ()) -> Ticket:
        """Read (arena, offset, host_out) ranges, then copy the `then` (dst, src) pairs (e.g. H2D)."""
        after = [t for t in after if t is not None]

        def job() -> torch.cuda.Event | None:
            for t in after:
                t.host_wait()
            for arena, offset, out in reads:
                arena.read_into(offset, out)
            return self._thread_copy(then)

        return self._run_host(job, (), pool=self._disk_pool if self.overlap else None)

    def disk_write(self, writes: Sequence[tuple[DiskArena, int, torch.Tensor]],
                   before: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), after: Iterable[Ticket] = ()) -> Ticket:
        """Copy the `before` (dst, src) pairs (e.g. D2H into staging), then write host tensors to disk."""
        after = [t for t in after if t is not None]

        def job() -> None:
            for t in after:
                t.host_wait()
            event = self._thread_copy(before)
            if event is not None:
                event.synchronize()
            for arena, offset, data in writes:
                arena.write(offset, data)

        return self._run_host(job, (), pool=self._disk_pool if self.overlap else None)

    def _thread_copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event | None:
        if not pairs:
            return None
        if not self.cuda:
            _copy_all(pairs)
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        return ev

    def _run_host(self, fn: Callable[[], object], after: Sequence[Ticket],
                  pool: ThreadPoolExecutor | None) -> Ticket:
        if pool is None:
            for t in after:
                t.host_wait()
            result = fn()
            return Ticket(event=result) if isinstance(result, torch.cuda.Event) else DONE

        def job() -> object:
            for t in after:
                t.host_wait()
            return fn()

        future = pool.submit(job)
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(future)
        return Ticket(future=future)

    def synchronize(self) -> None:
        """Wait for every queued copy (used at block boundaries and on close)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        for pool in (*self._copy_pools.values(), self._disk_pool):
            pool.shutdown(wait=True)


def _copy_all(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in pairs:
        dst.copy_(src)
