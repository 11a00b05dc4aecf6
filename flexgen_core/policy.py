"""The offloading policy: batch shape, placement fractions, compression, delegation.

Fractions are 0..1 (never percents): each placement is a (gpu, cpu, disk) triple summing to 1, where
"gpu" means the compute device's memory (CPU RAM when the compute device is the CPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any

Split = tuple[float, float, float]
_SUM_TOLERANCE = 1e-6


class Tier(str, Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)


class PolicyError(ValueError):
    """A malformed policy (bad fraction, bad batch size, unsupported combination)."""


def _check_split(name: str, value: Any) -> Split:
    try:
        parts = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"Policy.{name} must be three numbers (gpu, cpu, disk), got {value!r}") from exc
    if len(parts) != 3:
        raise PolicyError(f"Policy.{name} must have three fractions (gpu, cpu, disk), got {len(parts)}: {value!r}")
    if any(p < 0 or p > 1 for p in parts):
        hint = " (fractions are 0..1, not percents)" if any(p > 1 for p in parts) else ""
        raise PolicyError(f"Policy.{name}={value!r}: each fraction must be within [0, 1]{hint}")
    if abs(sum(parts) - 1.0) > _SUM_TOLERANCE:
        raise PolicyError(f"Policy.{name}={value!r} sums to {sum(parts):.6g}; gpu + cpu + disk must be 1")
    return parts  # type: ignore[return-value]


@dataclass(frozen=True)
class Policy:
    """How a model runs: `num_gpu_batches` GPU batches of `gpu_batch_size` sequences form one block.

    weights / cache / acts: (gpu, cpu, disk) fractions of each layer's weights, of each GPU batch's
    KV cache (split by sequences) and of the activations between layers (split by sequences).
    cpu_attention: in decode, attention over the part of the KV cache not on the GPU runs on the CPU.
    attn_topk: fraction of past positions whose V rows are read in decode (1.0 = dense attention).
    """

    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    weights: Split = (1.0, 0.0, 0.0)
    cache: Split = (1.0, 0.0, 0.0)
    acts: Split = (1.0, 0.0, 0.0)
    overlap: bool = True
    cpu_attention: bool = False
    compress_weights: bool = False
    compress_cache: bool = False
    attn_topk: float = 1.0
    pin_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"Policy.{name} must be a positive integer, got {value!r}")
        for name in ("weights", "cache", "acts"):
            object.__setattr__(self, name, _check_split(name, getattr(self, name)))
        for name in ("overlap", "cpu_attention", "compress_weights", "compress_cache", "pin_weights"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"Policy.{name} must be True or False, got {getattr(self, name)!r}")
        topk = self.attn_topk
        if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0 < topk <= 1:
            raise PolicyError(f"Policy.attn_topk must be in (0, 1] (fraction of past positions kept), got {topk!r}")

    @property
    def block_size(self) -> int:
        """Sequences generated together: gpu_batch_size * num_gpu_batches."""
        return self.gpu_batch_size * self.num_gpu_batches

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("weights", "cache", "acts"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown Policy fields {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        for name in ("weights", "cache", "acts"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def with_(self, **changes: Any) -> Policy:
        return replace(self, **changes)

    def describe(self) -> str:
        def pct(s: Split) -> str:
            return "/".join(f"{x:.2f}" for x in s)

        flags = [n for n in ("cpu_attention", "compress_weights", "compress_cache") if getattr(self, n)]
        if self.attn_topk < 1:
            flags.append(f"topk={self.attn_topk:g}")
        if not self.overlap:
            flags.append("no-overlap")
        return (f"{self.gpu_batch_size}x{self.num_gpu_batches} w={pct(self.weights)} c={pct(self.cache)} "
                f"a={pct(self.acts)}" + (" " + ",".join(flags) if flags else ""))


def split_count(total: int, split: Split) -> tuple[int, int, int]:
    """Split `total` items (sequences) into (gpu, cpu, disk) counts by cumulative rounding."""
    g = round(total * split[0])
    gc = round(total * (split[0] + split[1]))
    g = min(max(g, 0), total)
    gc = min(max(gc, g), total)
    return g, gc - g, total - gc
