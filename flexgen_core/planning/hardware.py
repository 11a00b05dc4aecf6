"""Hardware profile: what the cost model needs to know about a machine, with units in every field name.

A `HardwareProfile` holds memory capacities, link bandwidths (host<->device pinned and pageable, disk read
and write with the page cache bypassed or dropped), compute rates of the compute device (large matmul,
prefill attention, memory bandwidth, dequantization) and of the CPU (decode attention), and the fixed
host-side cost of one schedule step. It is saved as YAML in `profiles/`; `probe.measure()` writes one for the
machine it runs on. Bandwidths are decimal GB/s (1e9 bytes/s); capacities are GiB (2**30 bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

GIB = 1 << 30
GB = 1e9

PAGE_CACHE_STATES = ("bypassed", "dropped", "cached", "unknown")
OPTIONAL_RATES = ("host_memory_shared_gbps", "device_elementwise_gbps", "attn_step_overhead_us", "disk_acts_step_us",
                  "delegated_issue_us", "delegated_job_us", "delegated_latency_us")


class ProfileError(ValueError):
    """A profile file that is missing, does not parse, or has bad values."""


@dataclass(frozen=True)
class HardwareProfile:
    """Measured (or fitted) capacities and rates of one machine. See the module docstring for units."""

    name: str
    device_type: str  # "cuda" or "cpu": which compute device the rates describe
    device_name: str
    gpu_memory_gib: float  # compute-device memory (RAM when the compute device is the CPU)
    cpu_memory_gib: float
    disk_gib: float
    h2d_pinned_gbps: float
    h2d_pageable_gbps: float
    d2h_pinned_gbps: float
    d2h_pageable_gbps: float
    disk_read_gbps: float
    disk_write_gbps: float
    disk_page_cache: str  # how disk reads were measured: "bypassed" (O_DIRECT), "dropped", "cached"
    device_matmul_tflops: float  # large dense matmul in the engine's dtype
    device_bmm_tflops: float  # prefill-attention batched matmul
    device_memory_gbps: float  # memory-bound kernels: weight bytes/s read by a decode-shaped linear layer
    device_dequant_gelems_per_s: float  # 4-bit dequantization on the compute device, output elements
    cpu_attention_gflops: float  # decode attention on the CPU over a cache in the engine's dtype
    cpu_dequant_gelems_per_s: float  # 4-bit dequantization on the CPU (compressed cache, delegated attention)
    step_overhead_us: float  # host-side cost of one schedule step (one layer of one GPU batch)
    notes: str = ""
    # host RAM bandwidth that CPU-delegated attention and the host->device DMA share when they run together
    # (fitted from delegated runs; None: the cost model counts the two in series)
    host_memory_shared_gbps: float | None = None
    # memory-bound elementwise kernels around the matmuls (ReLU, residual adds, LayerNorm), bytes/s; None: not
    # modeled (profiles measured before the probe had it)
    device_elementwise_gbps: float | None = None
    # host-side cost of one attention-layer step, which issues several times the kernels of an MLP step; the
    # probe then gives `step_overhead_us` as the mean of the other kinds' steps. None: every kind costs
    # `step_overhead_us` (profiles measured before the probe timed the kinds apart)
    attn_step_overhead_us: float | None = None
    # time the engine adds to one prefill layer step of one GPU batch whose activations are partly on disk: the
    # hidden state's disk write and the next layer's read, chained through the disk threads, beyond their bytes
    # (decode keeps those rows' states in host RAM). None: not modeled
    disk_acts_step_us: float | None = None
    # CPU-delegated decode as the engine pipelines it (`runtime.schedule.paired_decode`), host microseconds per
    # GPU batch: the issuing thread's per (attention, MLP) pair, the attention thread's per job beyond its kernel,
    # and the latency from issuing a batch's attention to its host job's start (the device's q/k/v, their copy,
    # the thread's wake-up). Probed on a mid-size offloaded model (`_Prober.delegated_batch_costs_us`) or fitted
    # on measured runs. Without the first two the cost model keeps the serial delegated model, which does not
    # credit the pipeline; without the latency it counts none
    delegated_issue_us: float | None = None
    delegated_job_us: float | None = None
    delegated_latency_us: float | None = None

    def __post_init__(self) -> None:
        if self.device_type not in ("cuda", "cpu"):
            raise ProfileError(f"device_type must be 'cuda' or 'cpu', got {self.device_type!r}")
        if self.disk_page_cache not in PAGE_CACHE_STATES:
            raise ProfileError(f"disk_page_cache must be one of {PAGE_CACHE_STATES}, got {self.disk_page_cache!r}")
        for f in fields(self):
            if f.type in ("float", float):
                value = getattr(self, f.name)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ProfileError(f"profile field {f.name} must be a number, got {value!r}")
                if value < 0 or (value == 0 and f.name != "step_overhead_us"):
                    raise ProfileError(f"profile field {f.name} must be positive, got {value!r}")
        for name in OPTIONAL_RATES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ProfileError(f"profile field {name} must be a positive number, got {value!r}")

    @property
    def default_dtype_bytes(self) -> int:
        """Bytes per element of the engine's default dtype on this device: fp16 on CUDA, fp32 on the CPU."""
        return 2 if self.device_type == "cuda" else 4

    # ---- rates in SI units, for the cost model -------------------------------------------------
    def h2d_bytes_per_s(self, pinned: bool = True) -> float:
        return (self.h2d_pinned_gbps if pinned else self.h2d_pageable_gbps) * GB

    def d2h_bytes_per_s(self, pinned: bool = True) -> float:
        return (self.d2h_pinned_gbps if pinned else self.d2h_pageable_gbps) * GB

    @property
    def disk_read_bytes_per_s(self) -> float:
        return self.disk_read_gbps * GB

    @property
    def disk_write_bytes_per_s(self) -> float:
        return self.disk_write_gbps * GB

    @property
    def matmul_flops(self) -> float:
        return self.device_matmul_tflops * 1e12

    @property
    def bmm_flops(self) -> float:
        return self.device_bmm_tflops * 1e12

    @property
    def device_memory_bytes_per_s(self) -> float:
        return self.device_memory_gbps * GB

    @property
    def dequant_elems_per_s(self) -> float:
        return self.device_dequant_gelems_per_s * 1e9

    @property
    def cpu_attention_flops(self) -> float:
        return self.cpu_attention_gflops * 1e9

    @property
    def cpu_dequant_elems_per_s(self) -> float:
        return self.cpu_dequant_gelems_per_s * 1e9

    @property
    def step_overhead_s(self) -> float:
        return self.step_overhead_us * 1e-6

    def step_overhead_s_of(self, attention: bool) -> float:
        """Host-side seconds of one step of an attention layer (`attention`) or of any other layer."""
        if attention and self.attn_step_overhead_us is not None:
            return self.attn_step_overhead_us * 1e-6
        return self.step_overhead_s

    @property
    def disk_acts_step_s(self) -> float:
        return (self.disk_acts_step_us or 0.0) * 1e-6

    # ---- YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> HardwareProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: expected a mapping of profile fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        optional = ("notes", *OPTIONAL_RATES)
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name not in optional)
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing fields {missing}")
            if unknown:
                parts.append(f"unknown fields {unknown}")
            raise ProfileError(f"{source}: {'; '.join(parts)}. Regenerate it with `flexgen profile --out FILE`.")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ProfileError(f"{source}: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ("# Hardware profile for the flexgen cost model (flexgen profile). Units are in the field names:\n"
                  "# gbps = 1e9 bytes/s, gib = 2**30 bytes, tflops = 1e12 FLOP/s.\n")
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile {path} does not exist; create one with `flexgen profile --out {path}` "
                               "or use one from profiles/")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProfileError(f"profile {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def with_(self, **changes: Any) -> HardwareProfile:
        return replace(self, **changes)


def resolve_profile(name_or_path: str | Path, search_dir: str | Path | None = None) -> HardwareProfile:
    """Load a profile by path, or by name from `profiles/` (e.g. 'h100' -> profiles/h100.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return HardwareProfile.load(path)
    directory = Path(search_dir) if search_dir is not None else default_profiles_dir()
    for candidate in (directory / f"{name_or_path}.yaml", directory / str(name_or_path)):
        if candidate.is_file():
            return HardwareProfile.load(candidate)
    known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
    raise ProfileError(f"profile {name_or_path!r} not found (as a file or in {directory}; known: {known}). "
                       "Create one with `flexgen profile --out profiles/NAME.yaml`.")


def default_profiles_dir() -> Path:
    """The repository's `profiles/` directory."""
    return Path(__file__).resolve().parents[2] / "profiles"
