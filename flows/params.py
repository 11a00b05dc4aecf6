"""Flow parameters: pydantic models that the Prefect UI renders as forms, validated before any heavy work.

Each model refuses bad input with a message naming the field and what to write instead: unknown scenario,
malformed run entry, unknown metric, missing model, unwritable output path, a hardware profile that does not
parse, a policy file that does not parse. Whether a policy fits memory needs the model and the machine, so
`tasks.planning.check_fits` checks that next, still before any weights are loaded. Conversion to core objects
(Policy, HardwareProfile, the argparse namespace `flexgen_core.bench` reads) happens here and only here.
Instances are revalidated whenever Prefect validates flow parameters, so the flows' defaults are built with
`model_construct()` (importing a flow never touches the filesystem) and still checked when a run starts.
Imports neither torch nor Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flexgen_core.assets import TINY_MODEL_DIR
from flexgen_core.planning.hardware import HardwareProfile, resolve_profile
from flexgen_core.policy import Policy

Split = tuple[float, float, float]
POLICY_FIELDS = ("gpu_batch_size", "num_gpu_batches", "weights", "cache", "acts", "cpu_attention",
                 "compress_weights", "compress_cache", "attn_topk", "overlap", "pin_weights")
DEFAULT_MODEL = str(TINY_MODEL_DIR)
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """`path` made absolute, if it is a directory we can write to or can create (nothing is created)."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {target} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {target} is not writable ({probe} denies writing); choose another directory")
    return target


def model_directory(model: str, *, need_tokenizer: bool) -> str:
    """Check that `model` is a checkpoint directory (config.json[, tokenizer.json]) or a cached hub name."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json; pass a Hugging Face checkpoint directory")
        if need_tokenizer and not (path / "tokenizer.json").is_file():
            raise ValueError(f"model directory {path} has no tokenizer.json, which the evaluation needs to "
                             "tokenize prompts")
        return str(path)
    if HUB_NAME.fullmatch(model):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return model
    raise ValueError(f"model path {model} does not exist (not a directory, not a cached hub name); pass a local "
                     f"checkpoint directory, e.g. the shipped tiny model {DEFAULT_MODEL}")


class EngineParams(BaseModel):
    """How the engine runs: the offloading policy (auto or given), hardware profile, device and budgets."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    policy: str = Field("auto", description="'auto': the LP picks the policy for this machine and workload; or a "
                                            "policy JSON file (written by the plan flow or `flexgen policy --json`)")
    gpu_batch_size: int | None = Field(None, ge=1, description="sequences per GPU batch (fixed for auto)")
    num_gpu_batches: int | None = Field(None, ge=1, description="GPU batches per block (block = gbs * ngb)")
    weights: Split | None = Field(None, description="weight placement fractions (gpu, cpu, disk), summing to 1")
    cache: Split | None = Field(None, description="KV cache placement fractions (gpu, cpu, disk)")
    acts: Split | None = Field(None, description="activation placement fractions (gpu, cpu, disk)")
    cpu_attention: bool | None = Field(None, description="delegate decode attention to the CPU")
    compress_weights: bool | None = Field(None, description="4-bit group-wise weights")
    compress_cache: bool | None = Field(None, description="4-bit group-wise KV cache")
    attn_topk: float | None = Field(None, gt=0, le=1, description="fraction of past positions attended (sparse)")
    overlap: bool | None = Field(None, description="overlap I/O with compute (default on)")
    pin_weights: bool | None = Field(None, description="pin CPU weights (default on)")
    profile: str | None = Field(None, description="hardware profile for 'auto': a YAML path or a name in "
                                                  "profiles/ (default: measure this machine once, cached)")
    memory_margin: float = Field(0.05, ge=0, lt=0.9, description="fraction of each memory budget kept free")
    device: Literal["cpu", "cuda"] | None = Field(None, description="compute device (default: cuda if present)")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="compute dtype (default: float16 on cuda, float32 on cpu)")
    offload_dir: str | None = Field(None, description="directory for disk-tier files (default: a temp dir)")
    gpu_mem_gib: float | None = Field(None, gt=0, description="compute-device memory budget in GiB")
    cpu_mem_gib: float | None = Field(None, gt=0, description="CPU RAM budget in GiB")
    disk_gib: float | None = Field(None, gt=0, description="disk budget in GiB in the offload directory")
    pipeline_stages: int = Field(1, ge=1, description="pipeline degree: > 1 runs generation on this many processes "
                                                      "(one per GPU, torchrun), each holding a slice of the layers "
                                                      "with its own policy; the budgets are per process")
    micro_batches: int | None = Field(None, ge=1, description="pipeline: blocks in flight (default: the number of "
                                                              "stages)")
    timeout_s: float = Field(600.0, gt=0, description="pipeline: longest wait for another process before every "
                                                      "process stops with an error")

    @model_validator(mode="after")
    def _check(self) -> EngineParams:
        if self.policy == "auto":
            Policy(**self.fixed_fields())  # malformed fractions and the like, PolicyError (a ValueError)
        else:
            self.given_policy()
        if self.profile is not None:
            self.hardware_profile()
        if self.offload_dir is not None:
            writable_dir(self.offload_dir, "offload directory")
        return self

    def fixed_fields(self) -> dict[str, Any]:
        """Policy fields set explicitly (fixed for the LP, or overriding the policy file)."""
        return {f: getattr(self, f) for f in POLICY_FIELDS if getattr(self, f) is not None}

    def given_policy(self) -> Policy | None:
        """The policy of the JSON file with the explicit fields applied; None for 'auto'."""
        if self.policy == "auto":
            return None
        path = Path(self.policy).expanduser()
        if not path.is_file():
            raise ValueError(f"policy {self.policy!r} is neither 'auto' nor an existing policy JSON file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"policy file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"policy file {path} must hold a JSON object (a policy or {{'policy': ...}})")
        return Policy.from_dict(data.get("policy", data)).with_(**self.fixed_fields())

    def hardware_profile(self) -> HardwareProfile | None:
        return resolve_profile(self.profile) if self.profile is not None else None

    def identity_flags(self) -> dict[str, Any]:
        """What besides the weights and dtype changes results (the run identity): compression, top-k."""
        policy = self.given_policy() or Policy(**self.fixed_fields())
        return {"compress_weights": policy.compress_weights, "compress_cache": policy.compress_cache,
                "attn_topk": policy.attn_topk}

    def budget_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by `Engine.from_pretrained` and `choose_policy`."""
        return {"device": self.device, "offload_dir": self.offload_dir, "gpu_mem_gib": self.gpu_mem_gib,
                "cpu_mem_gib": self.cpu_mem_gib, "disk_gib": self.disk_gib}

    def check_pipeline(self, model: str) -> None:
        """Refuse more pipeline stages than `model` has transformer layers (from its config.json, no weights)."""
        if self.pipeline_stages > 1:
            layers = model_layers(model)
            if self.pipeline_stages > layers:
                raise ValueError(f"pipeline_stages={self.pipeline_stages} but {model} has only {layers} transformer "
                                 f"layers; every stage needs at least one: use at most {layers}")


def model_layers(model: str) -> int:
    """Transformer layers of a checkpoint directory or cached hub name, read from its config.json."""
    from flexgen_core.models import model_module

    path = Path(model).expanduser()
    config = path / "config.json"
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if not isinstance(cached, str):
            raise ValueError(f"model {model} has no config.json to read its layer count from")
        config = Path(cached)
    try:
        cfg = json.loads(config.read_text())
        archs = cfg.get("architectures") or ["OPTForCausalLM" if cfg.get("model_type") == "opt" else ""]
        return int(model_module(archs[0]).spec_from_hf_config(cfg, name=str(model)).num_layers)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the layer count of {model} from {config}: {exc}") from None


class EvaluateParams(BaseModel):
    """What to evaluate (HELM's `helm-run` vocabulary) and where the results go."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    run_entries: list[str] = Field(min_length=1, description="HELM run entries, e.g. "
                                                             "synthetic_reasoning:mode=pattern_match")
    suite: str = Field("default", description="results go to OUTPUT_PATH/runs/SUITE/<run name>")
    output_path: str = Field("benchmark_output", description="output directory (rerunning resumes from it)")
    max_eval_instances: int | None = Field(None, ge=1, description="evaluation instances per run entry")
    model: str = Field(DEFAULT_MODEL, description="checkpoint directory with tokenizer.json (default: the "
                                                  "shipped tiny OPT)")
    skip_completed_runs: bool = Field(False, description="skip run entries whose HELM outputs already exist")
    metrics: list[str] | None = Field(None, description="reference metrics to compute instead of each run "
                                                        "spec's own, e.g. [exact_match, f1_score]")
    fan_out_deployment: str | None = Field(None, description="deployment ('flow/deployment') that runs one "
                                                             "child flow run per run entry, so workers share them")

    @field_validator("run_entries")
    @classmethod
    def _entries(cls, entries: list[str]) -> list[str]:
        from flexgen_core.evaluation.run_spec import construct_run_spec

        names: dict[str, str] = {}
        for entry in entries:
            name = construct_run_spec(entry, model="model").name  # unknown scenario, bad arguments: ValueError
            if name in names:
                raise ValueError(f"run entries {names[name]!r} and {entry!r} are the same run; list it once")
            names[name] = entry
        return entries

    @field_validator("suite")
    @classmethod
    def _suite(cls, suite: str) -> str:
        if not suite or "/" in suite or suite in (".", ".."):
            raise ValueError(f"suite {suite!r} must be a plain name (no '/'), e.g. 'default'")
        return suite

    @field_validator("output_path")
    @classmethod
    def _output(cls, path: str) -> str:
        return str(writable_dir(path, "output path"))

    @field_validator("model")
    @classmethod
    def _model(cls, model: str) -> str:
        return model_directory(model, need_tokenizer=True)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, metrics: list[str] | None) -> list[str] | None:
        from flexgen_core.evaluation.metrics import get_metric

        for name in metrics or []:
            get_metric(name)  # ValueError listing the known metrics
        if metrics is not None and not metrics:
            raise ValueError("metrics is empty; leave it out to use each run spec's metrics")
        return metrics

    @field_validator("fan_out_deployment")
    @classmethod
    def _deployment(cls, name: str | None) -> str | None:
        if name is not None and name.count("/") != 1:
            raise ValueError(f"fan_out_deployment {name!r} must be 'flow-name/deployment-name', e.g. evaluate/local")
        return name

    def child(self, entry: str) -> EvaluateParams:
        """The parameters of the child run that evaluates `entry` alone (no further fan-out)."""
        return self.model_copy(update={"run_entries": [entry], "fan_out_deployment": None})


class PlanParams(BaseModel):
    """The workload to plan a policy for and where to write it."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str = Field(DEFAULT_MODEL, description="checkpoint directory, cached hub name or built-in size "
                                                  "(opt-125m ... opt-175b, planned from its shape alone)")
    prompt_len: int = Field(512, ge=1, description="prompt tokens per sequence")
    gen_len: int = Field(32, ge=1, description="new tokens per sequence")
    output: str | None = Field(None, description="policy JSON to write (default: policies/<model>-<profile>.json)")

    @field_validator("model")
    @classmethod
    def _model(cls, model: str) -> str:
        from flexgen_core.models import builtin_module

        return model if builtin_module(model) is not None else model_directory(model, need_tokenizer=False)

    @property
    def is_builtin(self) -> bool:
        return not Path(self.model).expanduser().is_dir() and "/" not in self.model


class ProfileParams(BaseModel):
    """Which machine measurement to take and where to write the profile YAML."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    name: str | None = Field(None, description="profile name (default: the host name)")
    device: Literal["cpu", "cuda"] | None = Field(None, description="device to profile (default: cuda if present)")
    offload_dir: str | None = Field(None, description="directory on the disk to measure (default: a temp dir)")
    quick: bool = Field(False, description="smaller sizes (seconds; for tests)")
    output: str | None = Field(None, description="YAML to write (default: profiles/<name>.yaml)")

    @field_validator("offload_dir")
    @classmethod
    def _offload(cls, path: str | None) -> str | None:
        return None if path is None else str(writable_dir(path, "offload directory"))


class BenchmarkParams(BaseModel):
    """A synthetic workload measured under one or more policies, optionally beside a transformers baseline."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str = Field(DEFAULT_MODEL, description="checkpoint directory, or a built-in size with dummy=true")
    dummy: bool = Field(False, description="random weights (built-in sizes need no checkpoint)")
    prompt_len: int = Field(64, ge=1, description="prompt tokens per sequence")
    gen_len: int = Field(16, ge=1, description="new tokens per sequence")
    num_blocks: int = Field(1, ge=1, description="blocks of gpu_batch_size * num_gpu_batches prompts")
    warmup: int = Field(1, ge=0, description="warm-up calls before measuring")
    seed: int = Field(0, description="seed of the synthetic prompts and dummy weights")
    policies: list[EngineParams] = Field(default_factory=lambda: [EngineParams()], min_length=1,
                                         description="policies to measure, each auto or given")
    hf_baseline: bool = Field(False, description="also measure Hugging Face transformers generate on the same "
                                                 "prompts (Accelerate offloads what the device cannot hold)")
    results_csv: str = Field("benchmark_output/benchmarks/throughput.csv", description="CSV the rows append to")
    plot: str = Field("benchmark_output/benchmarks/throughput.png", description="bar plot of throughput per policy")

    @model_validator(mode="after")
    def _check(self) -> BenchmarkParams:
        from flexgen_core.models import builtin_module

        if not (self.dummy and builtin_module(self.model) is not None):
            model_directory(self.model, need_tokenizer=False)
        if any(p.pipeline_stages > 1 for p in self.policies):
            raise ValueError("pipeline_stages applies to the evaluate flow; the benchmark flow runs one process "
                             "(measure a pipeline with `flexgen bench --nproc N`)")
        if self.hf_baseline and not Path(self.model).expanduser().is_dir():
            raise ValueError("hf_baseline needs a checkpoint directory as model (transformers loads it)")
        for path in (self.results_csv, self.plot):
            writable_dir(Path(path).parent, "results directory")
        return self

    def bench_namespace(self, engine: EngineParams) -> argparse.Namespace:
        """The namespace `flexgen_core.bench.run_bench` reads (as `flexgen bench` builds it)."""
        return argparse.Namespace(
            model=self.model, dummy=self.dummy, prompt_len=self.prompt_len, gen_len=self.gen_len,
            num_blocks=self.num_blocks, warmup=self.warmup, seed=self.seed, step_timing=False, print_tokens=False,
            policy=engine.policy, profile=engine.profile, memory_margin=engine.memory_margin, dtype=engine.dtype,
            **engine.budget_kwargs(), **{f: getattr(engine, f) for f in POLICY_FIELDS})
