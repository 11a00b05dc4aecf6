"""When the Triton kernels can run: on CUDA tensors with triton importable, or anywhere under Triton's
interpreter (`TRITON_INTERPRET=1`, CPU tensors), which is how the kernels' logic is tested without a GPU."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def available() -> bool:
    """Triton kernels can run on this machine's CUDA device."""
    return torch.cuda.is_available() and triton_importable()


def runs_on(*tensors: torch.Tensor) -> bool:
    """The Triton kernels can take these tensors (all CUDA with triton, or any device when interpreting)."""
    if not triton_importable():
        return False
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors) and available()
