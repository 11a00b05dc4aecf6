"""Messages between pipeline stages over torch.distributed, with bounded waits and errors reported on every rank.

`StageGroup.from_env` joins the process group the way torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so one machine and several machines work alike. Point-to-point
messages run on NCCL between GPUs and on gloo on CPU; collectives of control data (plan agreement, results)
always run on a gloo group. A message is a header (token, micro-batch, status) and an optional payload.

Sends are asynchronous (a gloo send completes only when the receiver takes it, so blocking sends in a ring
deadlock) and are waited for at the end of a block; every receive and every wait is bounded by `timeout_s`.
A dead peer closes its sockets, so its neighbours fail at once; the first rank that fails writes the reason
to the rendezvous store (`flexgen/abort`), and every rank that fails later reports that root cause. A hung peer
is found by a watchdog thread per rank that publishes, in the store, which peer it has waited for longer than
a second (`flexgen/waiting/<rank>`); a rank whose wait times out follows that chain to the rank waiting for
nobody, and blames it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

ABORT_KEY = "flexgen/abort"
WAITING_KEY = "flexgen/waiting/{}"
PUBLISH_AFTER_S = 1.0  # a wait longer than this is published for the other ranks
TAG_HEADER, TAG_DATA = 1, 2
GRACE_S = 4.0  # a rank that sees a peer's connection close waits this long for the peer's own reason
TIMEOUT_GRACE_S = 1.5  # a rank whose wait timed out waits this long for the other ranks to publish their waits
RUN, DONE = 0, 1  # header status: compute this round / this micro-batch has finished (no payload follows)
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PipelineError(RuntimeError):
    """A pipeline stage failed or a peer is gone; raised on every rank that notices."""


class StageGroup:
    """This process's place in the pipeline: rank r runs stage r; messages to neighbours and control collectives."""

    def __init__(self, rank: int, world_size: int, local_world_size: int, comm_device: torch.device,
                 store: dist.Store, control: Any, timeout_s: float) -> None:
        self.rank, self.world_size, self.local_world_size = rank, world_size, local_world_size
        self.comm_device, self.store, self.control = comm_device, store, control
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._pending: list[tuple[Any, torch.Tensor, int]] = []  # (work, tensor kept alive, destination)
        self._board = WaitBoard(rank, store)

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float) -> StageGroup:
        """Join the process group described by torchrun's environment variables (see the module doc)."""
        missing = [v for v in ENV if v not in os.environ]
        if missing:
            raise PipelineError(f"pipeline mode needs the torchrun environment ({', '.join(missing)} not set): launch "
                                "with `torchrun --nproc-per-node N ...` or `flexgen bench --nproc N`")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        timeout = datetime.timedelta(seconds=timeout_s)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent, timeout=timeout, wait_for_workers=False)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore("flexgen/pg", store), rank=rank, world_size=world,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        comm = device if device.type == "cuda" else torch.device("cpu")
        return cls(rank, world, local_world, comm, store, control, timeout_s)

    @property
    def last(self) -> int:
        return self.world_size - 1

    # ---- point to point ----------------------------------------------------------------------------------
    def send(self, dst: int, header: tuple[int, int, int], payload: torch.Tensor | None = None) -> None:
        """Queue `header` (and `payload`) for rank `dst`; completes when `dst` receives (see `flush`)."""
        with self._guard(f"sending to rank {dst}", dst):
            parts = [(torch.tensor(header, dtype=torch.long, device=self.comm_device), TAG_HEADER)]
            if payload is not None:
                parts.append((payload.to(self.comm_device).contiguous(), TAG_DATA))
            for tensor, tag in parts:
                self._pending.append((dist.isend(tensor, dst, tag=tag), tensor, dst))
        self._pending = [p for p in self._pending if not p[0].is_completed()]

    def recv_header(self, src: int, expect: tuple[int, int]) -> int:
        """The status of the next message from `src`, which must be for (token, micro-batch) `expect`."""
        header = self._recv(src, torch.empty(3, dtype=torch.long, device=self.comm_device), TAG_HEADER, "header")
        token, micro, status = (int(x) for x in header.tolist())
        if (token, micro) != expect:
            raise self.fail(f"rank {self.rank} expected token {expect[0]} of micro-batch {expect[1]} from rank {src} "
                            f"but got token {token} of micro-batch {micro}: the ranks run different calls (every "
                            "rank must call generate/score with the same arguments)")
        return status

    def recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._recv(src, torch.empty(shape, dtype=dtype, device=self.comm_device), TAG_DATA, "payload")

    def _recv(self, src: int, out: torch.Tensor, tag: int, what: str) -> torch.Tensor:
        with self._guard(f"waiting for a {what} from rank {src}", src), self._board.waiting(src):
            dist.irecv(out, src, tag=tag).wait(self.timeout)
        return out

    def flush(self) -> None:
        """Wait until every queued send was received (bounded)."""
        pending, self._pending = self._pending, []
        for work, _, dst in pending:
            with self._guard(f"waiting for rank {dst} to receive", dst), self._board.waiting(dst):
                work.wait(self.timeout)

    # ---- control collectives (gloo) ----------------------------------------------------------------------
    def all_gather_object(self, obj: object, doing: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self._guard(doing, None):
            dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int, doing: str) -> torch.Tensor:
        with self._guard(doing, src):
            dist.broadcast(tensor, src, group=self.control)
        return tensor

    def broadcast_object(self, obj: object, src: int, doing: str) -> Any:
        box = [obj]
        with self._guard(doing, src):
            dist.broadcast_object_list(box, src, group=self.control)
        return box[0]

    # ---- failures ----------------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """Record the root cause of a failure for the other ranks (first writer wins; best effort)."""
        with contextlib.suppress(Exception):
            self.store.compare_set(ABORT_KEY, "", reason)

    def abort_reason(self) -> str | None:
        with contextlib.suppress(Exception):
            if self.store.check([ABORT_KEY]):
                return self.store.get(ABORT_KEY).decode()
        return None

    def fail(self, reason: str, grace_s: float = 0.0) -> PipelineError:
        """A PipelineError naming the root cause: the first reason recorded by any rank. `grace_s`: how long to
        wait for another rank's reason first (a closed connection is often the symptom of a peer's failure)."""
        deadline = time.monotonic() + grace_s
        while self.abort_reason() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.abort(reason)
        first = self.abort_reason() or reason
        return PipelineError(f"pipeline aborted: {first}" + (f" [seen on rank {self.rank}: {reason}]"
                                                             if first != reason else ""))

    @contextlib.contextmanager
    def _guard(self, doing: str, peer: int | None) -> Iterator[None]:
        try:
            yield
        except PipelineError:
            raise
        except (RuntimeError, ValueError) as exc:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            text = _brief(exc)
            who = f"rank {peer}" if peer is not None else "a rank"
            grace = 0.0
            if "Timed out" in text or "timeout" in text.lower():
                cause = f"{who} did not answer within {self.timeout_s:g} s"
                if peer is not None:
                    time.sleep(TIMEOUT_GRACE_S)  # let the ranks that wait for others publish it
                    chain = self._board.chain(peer)
                    if len(chain) > 2:
                        hops = ", ".join(f"rank {a} waited for rank {b}"
                                         for a, b in zip(chain, chain[1:], strict=False))
                        cause = (f"rank {chain[-1]} did not answer within {self.timeout_s:g} s ({hops}; rank "
                                 f"{chain[-1]} waits for nobody: it hangs, or needs a longer timeout_s)")
            elif "closed" in text.lower() or "reset" in text.lower() or "refused" in text.lower():
                cause, grace = f"{who} is gone (connection closed; it probably died, see its log)", GRACE_S
            else:
                cause = f"communication with {who} failed"
            raise self.fail(f"on rank {self.rank}, {cause} while {doing}: {text}", grace) from exc

    def close(self) -> None:
        self._pending = []
        self._board.close()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _brief(exc: BaseException) -> str:
    """The gist of a gloo/NCCL error: first line, without the source location and the generic advice."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]


class WaitBoard:
    """Which peer this rank is blocked on, published to the store by a watchdog thread once a wait is long."""

    def __init__(self, rank: int, store: dist.Store) -> None:
        self.rank, self.store = rank, store
        self._state: tuple[int, float] | None = None  # (peer, since), written by the main thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"flexgen-waitboard-{rank}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, peer: int) -> Iterator[None]:
        """Mark a blocking wait for `peer`. A wait that fails stays published: the ranks that waited for this
        one follow the chain through it."""
        self._state = (peer, time.monotonic())
        yield
        self._state = None

    def _watch(self) -> None:
        published: tuple[int, float] | None = None
        key = WAITING_KEY.format(self.rank)
        while not self._stop.wait(0.25):
            state = self._state
            with contextlib.suppress(Exception):  # the store may be gone with rank 0: nothing to publish to
                if state is not None and state != published and time.monotonic() - state[1] > PUBLISH_AFTER_S:
                    self.store.set(key, str(state[0]))
                    published = state
                elif state is None and published is not None:
                    self.store.delete_key(key)
                    published = None

    def chain(self, peer: int) -> list[int]:
        """[this rank, peer, the rank peer waits for, ...] up to a rank that waits for nobody (or a cycle)."""
        out = [self.rank, peer]
        while True:
            key = WAITING_KEY.format(out[-1])
            try:
                nxt = int(self.store.get(key).decode()) if self.store.check([key]) else None
            except Exception:  # noqa: BLE001 (the store may be gone)
                nxt = None
            if nxt is None or nxt in out:
                return out
            out.append(nxt)

    def close(self) -> None:
        self._stop.set()
