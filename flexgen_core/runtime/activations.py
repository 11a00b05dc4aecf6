"""Homes of the hidden states between layers when the policy puts some of them off the device.

Rows of each GPU batch are split [gpu | cpu | disk] by the Plan's activation split. After a layer, a
batch's output goes to its homes (device copy, async device->host copy, host->disk write); before the
next layer it is brought back (prefetched while the previous batch computes).

The disk tier holds prefill-width hidden states (prompt length x hidden per sequence), which is where the
memory is. Decode-width states (one position) of the same rows stay in a small pinned host buffer: writing
and reading a few KiB through the disk threads at every layer step put disk latency on the critical path
(OPT-30B decode at 38 ms per layer step instead of 20, visit 9d).
"""

from __future__ import annotations

import torch

from flexgen_core.plan import ALIGN, Plan, align
from flexgen_core.policy import Tier
from flexgen_core.runtime.memory import DeviceArena, DiskArena, HostArena, OffloadDir, typed
from flexgen_core.runtime.transfer import Ticket, Transfer


class ActivationStore:
    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype, transfer: Transfer,
                 offload: OffloadDir) -> None:
        assert plan.workload is not None
        self.plan, self.device, self.dtype, self.transfer = plan, device, dtype, transfer
        self.split = plan.act_split
        h = plan.spec.hidden_size
        self.seq_bytes = plan.workload.prompt_len * h * dtype.itemsize  # one sequence at prefill width
        ngb = plan.policy.num_gpu_batches
        self.home_bytes = {t: align(self.split.count(t) * self.seq_bytes, ALIGN) for t in (Tier.GPU, Tier.CPU,
                                                                                            Tier.DISK)}
        cuda = device.type == "cuda"
        self.homes = {
            Tier.GPU: DeviceArena(ngb * self.home_bytes[Tier.GPU], device, "acts.gpu") if self.split.gpu else None,
            Tier.CPU: HostArena(ngb * self.home_bytes[Tier.CPU], pin=cuda, name="acts.cpu") if self.split.cpu else None,
            Tier.DISK: DiskArena(offload, "acts", ngb * self.home_bytes[Tier.DISK]) if self.split.disk else None,
        }
        self.staging = ([HostArena(self.home_bytes[Tier.DISK], pin=cuda, name="acts.staging") for _ in range(2)]
                        if self.split.disk else [])
        self.decode_bytes = align(self.split.disk * h * dtype.itemsize)  # one position of a batch's disk rows
        self.disk_decode = (HostArena(ngb * self.decode_bytes, pin=cuda, name="acts.disk_decode")
                            if self.split.disk else None)
        self._stored: dict[int, Ticket] = {}
        self._loaded: dict[int, tuple[torch.Tensor, Ticket]] = {}
        self._staging_turn = 0
        self._staging_free = [Ticket(), Ticket()]

    def _raw(self, tier: Tier, batch: int, nbytes: int) -> torch.Tensor:
        home = self.homes[tier]
        assert isinstance(home, (DeviceArena, HostArena))
        return home.view(batch * self.home_bytes[tier], nbytes)

    def _decode_raw(self, batch: int, nbytes: int) -> torch.Tensor:
        """Host home of one position of the disk rows (decode width)."""
        assert self.disk_decode is not None
        return self.disk_decode.view(batch * self.decode_bytes, nbytes)

    def store(self, batch: int, x: torch.Tensor) -> None:
        """Move a batch's layer output x: (rows, w, h) to its homes."""
        rows, w, h = x.shape
        mark = self.transfer.mark()
        tickets = []
        for tier, r0, r1 in self.split.segments(rows):
            part = x[r0:r1]
            n = part.numel() * self.dtype.itemsize
            if tier == Tier.GPU:
                typed(self._raw(tier, batch, n), self.dtype, part.shape).copy_(part)
            elif tier == Tier.CPU or w == 1:
                raw = self._raw(tier, batch, n) if tier == Tier.CPU else self._decode_raw(batch, n)
                dst = typed(raw, self.dtype, part.shape)
                tickets.append(self.transfer.copy([(dst, part)], after=[mark], lane="store"))
            else:
                arena = self.homes[Tier.DISK]
                assert isinstance(arena, DiskArena)
                host = (torch.empty(part.shape, dtype=self.dtype, pin_memory=True) if self.device.type == "cuda"
                        else part.clone())
                before = [(host, part)] if self.device.type == "cuda" else []
                tickets.append(self.transfer.disk_write([(arena, batch * self.home_bytes[tier], host)],
                                                        before=before, after=[mark, self._stored.get(batch)]))
        self._stored[batch] = Ticket.all(tickets)

    def prefetch(self, batch: int, rows: int, width: int) -> None:
        """Start bringing a batch's hidden state (rows, width, h) back to the device."""
        if batch in self._loaded:
            return
        h = self.plan.spec.hidden_size
        out = torch.empty(rows, width, h, dtype=self.dtype, device=self.device)
        after = [self.transfer.mark(), self._stored.get(batch)]
        tickets = []
        for tier, r0, r1 in self.split.segments(rows):
            dst = out[r0:r1]
            n = dst.numel() * self.dtype.itemsize
            if tier == Tier.GPU:
                dst.copy_(typed(self._raw(tier, batch, n), self.dtype, dst.shape))
            elif tier == Tier.CPU or width == 1:
                raw = self._raw(tier, batch, n) if tier == Tier.CPU else self._decode_raw(batch, n)
                src = typed(raw, self.dtype, dst.shape)
                tickets.append(self.transfer.copy([(dst, src)], after=after, lane="input"))
            else:
                turn = self._staging_turn
                self._staging_turn ^= 1
                stage = self.staging[turn].view(0, align(n, ALIGN))
                arena = self.homes[Tier.DISK]
                t = self.transfer.disk_read([(arena, batch * self.home_bytes[tier], stage)],
                                            then=[(dst, typed(stage, self.dtype, dst.shape))],
                                            after=[*after, self._staging_free[turn]])
                self._staging_free[turn] = t
                tickets.append(t)
        self._loaded[batch] = (out, Ticket.all(tickets))

    def load(self, batch: int, rows: int, width: int) -> torch.Tensor:
        self.prefetch(batch, rows, width)
        out, ticket = self._loaded.pop(batch)
        ticket.wait()
        return out

    def finish_block(self) -> None:
        for t in self._stored.values():
            t.host_wait()
        for _, t in self._loaded.values():
            t.host_wait()
        self._stored.clear()
        self._loaded.clear()

    def close(self) -> None:
        self.finish_block()
        for home in self.homes.values():
            if isinstance(home, (HostArena, DiskArena)):
                home.close()
        for buf in self.staging:
            buf.close()
        if self.disk_decode is not None:
            self.disk_decode.close()
