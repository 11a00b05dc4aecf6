"""Weight homes on the three tiers, and per-layer loading into the compute device's rotating slots.

`WeightStore` allocates one arena per tier exactly as the Plan sized it, writes each tensor's row pieces
(quantized once, on the compute device, when weights are compressed) to the offsets the Plan chose, and
at run time streams a layer's non-resident pieces into one of the device slots: CPU pieces by async
copies from pinned memory, disk pieces by background reads into pinned staging and then a copy.
`materialize` gives the layer's tensors as device views; compressed matrices are dequantized into one
reused buffer, once per layer and block, shared by all GPU batches.
"""

from __future__ import annotations

import torch

from flexgen_core.plan import PIECE_ALIGN, WEIGHT_QUANT, Piece, Plan, TensorPlacement, align
from flexgen_core.policy import Tier
from flexgen_core.quant import PackedTensor, codes_shape, dequantize_moved, quantize, scales_shape
from flexgen_core.runtime.memory import DeviceArena, DiskArena, HostArena, OffloadDir, typed
from flexgen_core.runtime.transfer import DONE, Ticket, Transfer
from flexgen_core.spec import LayerKind


class WeightStore:
    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype, transfer: Transfer,
                 offload: OffloadDir) -> None:
        self.plan, self.device, self.dtype, self.transfer = plan, device, dtype, transfer
        cuda = device.type == "cuda"
        arenas = plan.weight_arena_bytes
        self.homes: dict[Tier, DeviceArena | HostArena | DiskArena | None] = {
            Tier.GPU: DeviceArena(arenas[Tier.GPU], device, "weights.gpu") if arenas[Tier.GPU] else None,
            Tier.CPU: (HostArena(arenas[Tier.CPU], pin=cuda and plan.policy.pin_weights, name="weights.cpu")
                       if arenas[Tier.CPU] else None),
            Tier.DISK: DiskArena(offload, "weights", arenas[Tier.DISK]) if arenas[Tier.DISK] else None,
        }
        n = plan.weight_slots
        self.slots = [DeviceArena(plan.slot_bytes, device, f"weights.slot{i}") for i in range(n)]
        self.staging = ([HostArena(plan.weight_staging_bytes, pin=cuda, name=f"weights.staging{i}")
                         for i in range(n)] if plan.weight_staging_bytes else [])
        self.dequant = DeviceArena(plan.dequant_bytes, device, "weights.dequant") if plan.dequant_bytes else None
        self._slot_free: list[Ticket] = [DONE] * n
        self._staging_free: list[Ticket] = [DONE] * n
        self._loaded: list[int | None] = [None] * n
        self._tickets: list[Ticket] = [DONE] * n
        self._written: set[tuple[int, str]] = set()
        self._views: dict[tuple[int, int], tuple[dict[str, torch.Tensor], list[tuple[PackedTensor, torch.Tensor]]]] = {}

    # ---- writing (load time) -------------------------------------------------------------------
    def write_tensor(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        """Store one full tensor (any dtype/device) into its pieces; quantizes on the compute device."""
        placement = self.plan.layer(layer).tensor(name)
        if tuple(tensor.shape) != placement.spec.shape:
            raise ValueError(f"layer {layer} {name}: shape {tuple(tensor.shape)} != {placement.spec.shape}")
        for piece in placement.pieces:
            rows = tensor[piece.row_start:piece.row_stop].to(self.device, self.dtype)
            if piece.packed:
                packed = quantize(rows, WEIGHT_QUANT.bits, WEIGHT_QUANT.group_size, dim=0)
                self._write_bytes(piece, 0, packed.codes)
                self._write_bytes(piece, align(piece.code_bytes, PIECE_ALIGN), packed.scales)
            else:
                self._write_bytes(piece, 0, rows)
        self._written.add((layer, name))

    def _write_bytes(self, piece: Piece, at: int, data: torch.Tensor) -> None:
        raw = data.contiguous().view(torch.uint8).reshape(-1)
        home = self.homes[piece.tier]
        if isinstance(home, DiskArena):
            home.write(piece.offset + at, raw.cpu())
        else:
            assert home is not None
            home.view(piece.offset + at, raw.numel()).copy_(raw)

    def missing(self) -> list[tuple[int, str]]:
        owned = [(lay.spec.index, t.spec.name) for lay in self.plan.layers for t in lay.tensors
                 if t.spec.shared_from is None]
        return [key for key in owned if key not in self._written]

    def finish_writes(self) -> None:
        disk = self.homes[Tier.DISK]
        if isinstance(disk, DiskArena):
            disk.finish_writes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- streaming (run time) ------------------------------------------------------------------
    def prefetch(self, layer: int, slot: int) -> Ticket:
        """Start copying `layer`'s non-resident pieces into device slot `slot`."""
        if self._loaded[slot] == layer:
            return self._tickets[slot]
        lay = self.plan.layer(layer)
        dst_slot = self.slots[slot]
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        reads: list[tuple[DiskArena, int, torch.Tensor]] = []
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        staging_at = 0
        for t in lay.tensors:
            for piece in t.pieces:
                if piece.slot_offset is None:
                    continue
                dst = dst_slot.view(piece.slot_offset, piece.nbytes)
                home = self.homes[piece.tier]
                if isinstance(home, DiskArena):
                    size = align(piece.nbytes, 4096)
                    buf = self.staging[slot].view(staging_at, size)
                    reads.append((home, piece.offset, buf))
                    staged.append((dst, buf[:piece.nbytes]))
                    staging_at += size
                else:
                    assert home is not None
                    copies.append((dst, home.view(piece.offset, piece.nbytes)))
        free = self._slot_free[slot]
        tickets = [self.transfer.copy(copies, after=[free])] if copies else []
        if reads:
            disk_ticket = self.transfer.disk_read(reads, then=staged, after=[free, self._staging_free[slot]])
            self._staging_free[slot] = disk_ticket
            tickets.append(disk_ticket)
        ticket = Ticket.all(tickets)
        self._loaded[slot], self._tickets[slot] = layer, ticket
        return ticket

    def release(self, slot: int) -> None:
        """The compute issued so far is the last use of `slot`'s contents."""
        self._slot_free[slot] = self.transfer.mark()

    def materialize(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        """Device views of `layer`'s tensors (waits for its prefetch into `slot`; dequantizes packed ones)."""
        if self._loaded[slot] != layer:
            self.prefetch(layer, slot)
        self._tickets[slot].wait()
        key = (layer, slot)
        cached = self._views.get(key)
        if cached is None:
            cached = self._views[key] = self._build_views(layer, slot)
        views, dequant_jobs = cached
        for packed, out in dequant_jobs:
            dequantize_moved(packed, out=out)
        return views

    def _build_views(self, layer: int, slot: int
                     ) -> tuple[dict[str, torch.Tensor], list[tuple[PackedTensor, torch.Tensor]]]:
        """The views of a layer in a slot never change: build them once (buffers are preallocated)."""
        lay = self.plan.layer(layer)
        views: dict[str, torch.Tensor] = {}
        jobs: list[tuple[PackedTensor, torch.Tensor]] = []
        for t in lay.tensors:
            views[t.spec.name] = self._device_tensor(t, slot, jobs)
        if lay.spec.kind == LayerKind.HEAD and "tok" not in views:
            raise RuntimeError("head layer without the tied embedding")
        return views, jobs

    def _device_tensor(self, t: TensorPlacement, slot: int, jobs: list[tuple[PackedTensor, torch.Tensor]]
                       ) -> torch.Tensor:
        shape = t.spec.shape
        if t.packed:
            assert self.dequant is not None and t.dequant_offset is not None
            nbytes = t.spec.numel * self.dtype.itemsize
            moved = typed(self.dequant.view(t.dequant_offset, nbytes), self.dtype, (*shape[1:], shape[0]))
            for piece in t.pieces:
                raw = (self.homes[Tier.GPU].view(piece.offset, piece.nbytes) if piece.slot_offset is None  # type: ignore[union-attr]
                       else self.slots[slot].view(piece.slot_offset, piece.nbytes))
                jobs.append((_packed_view(raw, piece, self.dtype), moved[..., piece.row_start:piece.row_stop]))
            return moved.movedim(-1, 0)  # (out, in) view of the (in, out) buffer
        nbytes = t.spec.numel * self.dtype.itemsize
        if t.slot_offset is None:  # resident: a single GPU piece
            piece = t.pieces[0]
            return typed(self.homes[Tier.GPU].view(piece.offset, nbytes), self.dtype, shape)  # type: ignore[union-attr]
        return typed(self.slots[slot].view(t.slot_offset, nbytes), self.dtype, shape)

    def close(self) -> None:
        for home in self.homes.values():
            if isinstance(home, (HostArena, DiskArena)):
                home.close()
        for buf in self.staging:
            buf.close()
        self.homes = {}


def _packed_view(raw: torch.Tensor, piece: Piece, dtype: torch.dtype) -> PackedTensor:
    cshape = codes_shape(piece.shape, 0, WEIGHT_QUANT)
    sshape = scales_shape(piece.shape, 0, WEIGHT_QUANT)
    codes = typed(raw[:piece.code_bytes], torch.uint8, cshape)
    scales = typed(raw[align(piece.code_bytes, PIECE_ALIGN):], torch.float16, sshape)
    return PackedTensor(codes, scales, piece.shape, 0, WEIGHT_QUANT, dtype)
