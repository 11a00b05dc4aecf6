"""Find and read Hugging Face checkpoints, tensor by tensor, without loading the whole model.

A model is a local directory (config.json + *.safetensors or pytorch_model*.bin, single or sharded with
an index file), a hub name resolved through the local hub cache only (nothing is downloaded), or a
built-in size used with dummy weights. `.bin` files are opened with `weights_only=True` (no arbitrary
unpickling) and memory-mapped. Names and shapes are validated against the model spec before any weight
is written, so a bad checkpoint is refused before the engine allocates or writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flexgen_core.models import builtin_module, model_module
from flexgen_core.spec import ModelSpec, layer_specs


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match its config."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    spec: ModelSpec
    directory: Path | None  # None: built-in size (dummy weights only)
    files: tuple[Path, ...]
    revision: str

    @property
    def format(self) -> str:
        if not self.files:
            return "none"
        return "safetensors" if self.files[0].suffix == ".safetensors" else "bin"


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def _hub_snapshot(name: str) -> Path | None:
    for cache in _hub_cache_dirs():
        repo = cache / ("models--" + name.replace("/", "--"))
        if not repo.is_dir():
            continue
        ref = repo / "refs" / "main"
        snapshots = repo / "snapshots"
        if ref.is_file():
            snap = snapshots / ref.read_text().strip()
            if (snap / "config.json").is_file():
                return snap
        if snapshots.is_dir():
            for snap in sorted(snapshots.iterdir()):
                if (snap / "config.json").is_file():
                    return snap
    return None


def resolve(model: str | os.PathLike, dummy: bool = False) -> Checkpoint:
    """Locate `model`: a checkpoint directory, a hub name in the local cache, or (dummy) a built-in size."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_directory(path, path.name, need_weights=not dummy)
    name = str(model)
    snapshot = _hub_snapshot(name) if "/" in name else None
    if snapshot is not None:
        return _from_directory(snapshot, name, need_weights=not dummy)
    module = builtin_module(name)
    if dummy and module is not None:
        spec = module.builtin_spec(name)
        return Checkpoint(spec.name, spec, None, (), f"builtin:{spec.name}")
    caches = ", ".join(str(c) for c in _hub_cache_dirs())
    hint = (f" '{name}' is a built-in size: add --dummy (dummy=True) to run it with random weights."
            if module is not None else "")
    raise CheckpointError(
        f"model {name!r} not found: it is not a directory and not in the local Hugging Face cache ({caches}). "
        f"Download it first, e.g. `huggingface-cli download {name if '/' in name else 'facebook/' + name} "
        f"--local-dir ./models/{name.split('/')[-1]}`, then pass that directory.{hint}")


def _from_directory(directory: Path, name: str, need_weights: bool) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a Hugging Face checkpoint directory is needed")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    archs = cfg.get("architectures") or ["OPTForCausalLM" if cfg.get("model_type") == "opt" else ""]
    try:
        module = model_module(archs[0])
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    try:
        spec = module.spec_from_hf_config(cfg, name=name)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    files = _weight_files(directory)
    if need_weights and not files:
        raise CheckpointError(f"{directory} has no *.safetensors or pytorch_model*.bin weight files")
    return Checkpoint(name, spec, directory, files, _revision(directory, config_path, files))


def _weight_files(directory: Path) -> tuple[Path, ...]:
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing}")
            return tuple(directory / n for n in names)
        found = sorted(directory.glob(pattern))
        if found:
            return tuple(found)
    return ()


def _revision(directory: Path, config: Path, files: tuple[Path, ...]) -> str:
    ref = directory.parent.parent / "refs" / "main"
    if directory.parent.name == "snapshots" and ref.is_file():
        return ref.read_text().strip()
    h = hashlib.sha256(config.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------


def _open_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def tensor_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint, from headers (safetensors) or lazy maps (.bin)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in ckpt.files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[name] = tuple(st.get_slice(name).get_shape())
        else:
            for name, t in _open_bin(f).items():
                shapes[name] = tuple(t.shape)
    return shapes


def validate(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose tensor names or shapes do not match its spec (before loading)."""
    module = model_module(ckpt.spec.architecture)
    expected: dict[tuple[int, str], tuple[int, ...]] = {
        (layer.index, t.name): t.shape for layer in layer_specs(ckpt.spec) for t in layer.owned}
    seen: set[tuple[int, str]] = set()
    problems: list[str] = []
    for name, shape in tensor_shapes(ckpt).items():
        try:
            slot = module.map_weight_name(ckpt.spec, name)
        except KeyError:
            problems.append(f"unexpected tensor {name} {list(shape)}")
            continue
        if slot is None:
            continue
        if slot not in expected:
            problems.append(f"unexpected tensor {name}")
        elif tuple(shape) != expected[slot]:
            problems.append(f"tensor {name} has shape {list(shape)}, config says {list(expected[slot])}")
        seen.add(slot)
    for slot in sorted(set(expected) - seen):
        problems.append(f"missing tensor for layer {slot[0]} '{slot[1]}' (shape {list(expected[slot])})")
    if problems:
        listed = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {ckpt.directory} does not match its config.json: {listed}")


def iter_tensors(ckpt: Checkpoint, keep: Callable[[int, str], bool] | None = None
                 ) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Yield (schedule layer, tensor name, tensor) one tensor at a time (tied copies skipped).

    keep: which (layer, name) to read; the others are skipped without reading their data (a pipeline stage
    reads only its slice).
    """
    module = model_module(ckpt.spec.architecture)
    for f in ckpt.files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118
                    slot = module.map_weight_name(ckpt.spec, name)
                    if slot is not None and (keep is None or keep(*slot)):
                        yield slot[0], slot[1], st.get_tensor(name)
        else:
            state = _open_bin(f)  # memory-mapped: skipped tensors are never read
            for name in list(state):
                slot = module.map_weight_name(ckpt.spec, name)
                tensor = state.pop(name)
                if slot is not None and (keep is None or keep(*slot)):
                    yield slot[0], slot[1], tensor
            del state
