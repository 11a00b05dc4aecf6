"""Storage for the three tiers: device arenas, (pinned) host arenas, and offload files on disk.

Each arena is one allocation of exactly the bytes the Plan computed, carved into views by offset, so
there is no per-tensor allocation and no power-of-two rounding of pinned blocks (host memory is pinned
with cudaHostRegister on a plain allocation). Disk arenas are real files in a private directory that is
removed on close; reads can bypass the page cache (O_DIRECT) when the file system allows it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

PAGE = 4096


def _aligned_empty(nbytes: int, alignment: int = PAGE) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose data pointer is `alignment`-aligned."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift:shift + nbytes]


class HostArena:
    """One host allocation; pinned (page-locked, registered with CUDA) when `pin` is set."""

    def __init__(self, nbytes: int, pin: bool, name: str = "host") -> None:
        self.nbytes = nbytes
        self.name = name
        self.buffer = _aligned_empty(max(nbytes, 1))
        self.pinned = False
        if pin and nbytes and torch.cuda.is_available():
            self.pinned = _register(self.buffer)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        if offset + nbytes > self.nbytes:
            raise IndexError(f"{self.name} arena view [{offset}, {offset + nbytes}) beyond {self.nbytes} bytes")
        return self.buffer[offset:offset + nbytes]

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False


def _register(buffer: torch.Tensor) -> bool:
    try:
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    except (AttributeError, RuntimeError):
        return False
    if isinstance(err, tuple):
        err = err[0]
    return int(getattr(err, "value", err)) == 0


class DeviceArena:
    """One allocation on the compute device (the "gpu" tier)."""

    def __init__(self, nbytes: int, device: torch.device, name: str = "device") -> None:
        self.nbytes = nbytes
        self.name = name
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        if offset + nbytes > self.nbytes:
            raise IndexError(f"{self.name} arena view [{offset}, {offset + nbytes}) beyond {self.nbytes} bytes")
        return self.buffer[offset:offset + nbytes]


def typed(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Interpret a uint8 view as a tensor of `dtype` and `shape` (no copy)."""
    n = 1
    for s in shape:
        n *= s
    size = n * torch.empty((), dtype=dtype).element_size()
    return raw[:size].view(dtype).view(shape)


class OffloadDir:
    """A private directory for this engine's offload files, created on demand, removed on close."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        base = Path(root) if root is not None else Path(tempfile.gettempdir()) / "flexgen_offload"
        self.root = base
        self.path: Path | None = None

    def free_bytes(self) -> int:
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def ensure(self) -> Path:
        if self.path is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                path = self.root / f"flexgen-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                path.mkdir()
            except OSError as exc:
                raise PermissionError(
                    f"offload directory {self.root} is not writable ({exc.strerror}); pass --offload-dir "
                    "pointing to a writable directory with enough free space") from exc
            self.path = path
        return self.path

    def check_writable(self) -> None:
        self.ensure()

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


class DiskArena:
    """A file of `nbytes` in the offload directory, with positional reads and writes.

    Writes are buffered; `finish_writes` flushes them and drops them from the page cache. Reads of
    page-aligned ranges into page-aligned buffers use O_DIRECT when the file system supports it
    (`direct` tells), so benchmarks do not measure the page cache.
    """

    def __init__(self, offload: OffloadDir, name: str, nbytes: int) -> None:
        self.path = offload.ensure() / f"{name}.bin"
        self.nbytes = nbytes
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(self.fd, nbytes)
        except OSError:
            os.close(self.fd)
            raise
        self.direct_fd: int | None = None
        if hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct_fd = None

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def write(self, offset: int, data: torch.Tensor) -> None:
        """Write a contiguous CPU tensor's bytes at `offset`."""
        mv = memoryview(data.contiguous().view(torch.uint8).numpy())
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)

    def read_into(self, offset: int, out: torch.Tensor) -> None:
        """Fill the contiguous uint8 CPU tensor `out` from `offset`."""
        n = out.numel()
        fd = self.fd
        if (self.direct_fd is not None and offset % PAGE == 0 and n % PAGE == 0
                and out.data_ptr() % PAGE == 0):
            fd = self.direct_fd
        mv = memoryview(out.numpy())
        done = 0
        while done < n:
            got = os.preadv(fd, [mv[done:]], offset + done)
            if got <= 0:
                if fd != self.fd:  # O_DIRECT refused at read time: fall back to buffered reads
                    fd = self.fd
                    continue
                raise OSError(f"short read from {self.path} at {offset + done}")
            done += got

    def finish_writes(self) -> None:
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.direct_fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
