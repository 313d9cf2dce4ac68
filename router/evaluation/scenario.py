"""A benchmark scenario (TOML): the model, the tenants and their workloads, and the deployments to compare.

    name = "bursty-4-tenants"
    model = "../../shared/models/qwen2moe-tiny-code"   # a model directory (relative to this file), or
                                                         # "random:tiny" / "random:qwen-dims" (seeded weights)
    random_layers = 4               # layers of a random model
    popularity_from = "../../shared/models/qwen2moe-tiny-code"   # random:qwen-dims only: gates that route like
                                    # this trained model (relative to this file; router/evaluation/qwen_weights.py)
    seed = 7
    duration_s = 240                # requests arrive over this window
    max_prompt_tokens = 192         # every prompt is cut to this
    max_output_tokens = 48          # and every output
    baseline_dtype = "float32"      # of the full-model baselines ("bfloat16" allowed; say so in the text)

    [[tenants]]
    name = "coder"
    corpus = "python"               # python | prose | json | shell: what its prompts are made of
    arrival = { process = "trace", trace = "code", offset_s = 0.0, time_scale = 20.0 }
    #         { process = "poisson", rate_per_s = 0.2 }  |  { process = "gamma", rate_per_s = 0.2, cv = 4.0 }
    prompt_tokens = { from = "trace", scale = 0.05 }   # or { median = 60, sigma = 0.5 } (lognormal)
    output_tokens = { from = "trace", scale = 1.0 }

    [[deployments]]                 # run in this order; each is started as real processes
    kind = "full-per-tenant"        # full-per-tenant | full-shared | mesh
    [[deployments]]
    kind = "mesh"
    routers = "shared"              # shared (one router) | private (one per tenant)
    group_size = 4
    keep_alive_s = "inf"            # or seconds
    nodes = 3
    node_memory_mb = 2048
    replicas = "1"                  # the router's --replicas policy: 1 (the default) | 2 | auto

Every value is checked; a wrong one is a ConfigError naming the file and the key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.replicas import DEFAULT_MODE, MODES

CORPORA = ("python", "prose", "json", "shell")
TRACES = ("code", "conv")
KINDS = ("full-per-tenant", "full-shared", "mesh")


@dataclass(frozen=True)
class Arrival:
    process: str                     # poisson | gamma | trace
    rate_per_s: float = 0.0
    cv: float = 1.0
    trace: str = ""
    offset_s: float = 0.0            # where in the trace slice to start
    time_scale: float = 1.0          # trace seconds x time_scale = scenario seconds


@dataclass(frozen=True)
class Lengths:
    from_trace: bool = False
    scale: float = 1.0               # trace tokens x scale
    median: float = 32.0             # lognormal, when not from the trace
    sigma: float = 0.5


@dataclass(frozen=True)
class TenantSpec:
    name: str
    corpus: str
    arrival: Arrival
    prompt_tokens: Lengths
    output_tokens: Lengths


@dataclass(frozen=True)
class DeploymentSpec:
    kind: str
    routers: str = "shared"
    group_size: int = 4
    keep_alive_s: float = math.inf
    nodes: int = 3
    node_memory_mb: float = 2048.0
    replicas: str = DEFAULT_MODE

    @property
    def label(self) -> str:
        if self.kind != "mesh":
            return self.kind
        ka = "inf" if math.isinf(self.keep_alive_s) else f"{self.keep_alive_s:g}s"
        return f"mesh-{self.routers}-G{self.group_size}-ka{ka}" + (f"-r{self.replicas}" if self.replicas != DEFAULT_MODE
                                                                     else "")


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    path: Path
    seed: int = 0
    duration_s: float = 60.0
    max_prompt_tokens: int = 128
    max_output_tokens: int = 32
    random_layers: int = 2
    baseline_dtype: str = "float32"
    tenants: tuple[TenantSpec, ...] = ()
    deployments: tuple[DeploymentSpec, ...] = field(default_factory=tuple)
    popularity_from: str = ""        # random:qwen-dims: a trained model whose routing the gates imitate

    def popularity_dir(self) -> Path | None:
        if not self.popularity_from:
            return None
        path = Path(self.popularity_from)
        return path if path.is_absolute() else (self.path.parent / path).resolve()

    def model_dir(self) -> Path | None:
        """The model's directory, None for a random model."""
        if self.model.startswith("random:"):
            return None
        path = Path(self.model)
        return path if path.is_absolute() else (self.path.parent / path).resolve()


def _number(where: str, raw: dict, key: str, default, lo: float = 0.0, strict: bool = True, inf: bool = False):
    value = raw.get(key, default)
    if value == "inf" and inf:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= lo if strict else value < lo):
        raise ConfigError(f"{where}: {key} must be a number {'>' if strict else '>='} {lo:g}, got {value!r}")
    return value


def _lengths(where: str, raw) -> Lengths:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    if raw.get("from") == "trace":
        return Lengths(True, scale=_number(where, raw, "scale", 1.0))
    if "from" in raw:
        raise ConfigError(f"{where}: 'from' can only be \"trace\"")
    return Lengths(False, median=_number(where, raw, "median", 32.0), sigma=_number(where, raw, "sigma", 0.5, strict=False))


def _arrival(where: str, raw) -> Arrival:
    if not isinstance(raw, dict) or raw.get("process") not in ("poisson", "gamma", "trace"):
        raise ConfigError(f"{where}: arrival.process must be poisson, gamma or trace")
    process = raw["process"]
    if process == "trace":
        if raw.get("trace") not in TRACES:
            raise ConfigError(f"{where}: arrival.trace must be one of {', '.join(TRACES)}")
        return Arrival("trace", trace=raw["trace"], offset_s=_number(where, raw, "offset_s", 0.0, strict=False),
                       time_scale=_number(where, raw, "time_scale", 1.0))
    return Arrival(process, rate_per_s=_number(where, raw, "rate_per_s", 1.0),
                   cv=_number(where, raw, "cv", 1.0) if process == "gamma" else 1.0)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the scenario ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    where = str(path)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: 'model' must name a model directory or random:tiny / random:qwen-dims")
    if model.startswith("random:") and model not in ("random:tiny", "random:qwen-dims"):
        raise ConfigError(f"{where}: unknown random model {model!r} (random:tiny or random:qwen-dims)")
    tenants = []
    for i, t in enumerate(raw.get("tenants", [])):
        tw = f"{where}: tenants[{i}]"
        name = t.get("name", f"tenant{i}")
        if t.get("corpus") not in CORPORA:
            raise ConfigError(f"{tw}: corpus must be one of {', '.join(CORPORA)}")
        tenants.append(TenantSpec(name, t["corpus"], _arrival(tw, t.get("arrival")),
                                  _lengths(f"{tw}.prompt_tokens", t.get("prompt_tokens", {})),
                                  _lengths(f"{tw}.output_tokens", t.get("output_tokens", {}))))
    if not tenants:
        raise ConfigError(f"{where}: no [[tenants]]")
    if len({t.name for t in tenants}) != len(tenants):
        raise ConfigError(f"{where}: two tenants share a name")
    deployments = []
    for i, d in enumerate(raw.get("deployments", [])):
        dw = f"{where}: deployments[{i}]"
        if d.get("kind") not in KINDS:
            raise ConfigError(f"{dw}: kind must be one of {', '.join(KINDS)}")
        if d.get("routers", "shared") not in ("shared", "private"):
            raise ConfigError(f"{dw}: routers must be shared or private")
        if str(d.get("replicas", DEFAULT_MODE)) not in MODES:
            raise ConfigError(f"{dw}: replicas must be one of {', '.join(MODES)}")
        deployments.append(DeploymentSpec(
            d["kind"], d.get("routers", "shared"), int(_number(dw, d, "group_size", 4)),
            _number(dw, d, "keep_alive_s", "inf", strict=False, inf=True), int(_number(dw, d, "nodes", 3)),
            float(_number(dw, d, "node_memory_mb", 2048.0)), str(d.get("replicas", DEFAULT_MODE))))
    if not deployments:
        raise ConfigError(f"{where}: no [[deployments]]")
    if raw.get("baseline_dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError(f"{where}: baseline_dtype must be float32 or bfloat16")
    popularity = raw.get("popularity_from", "")
    if popularity and (model != "random:qwen-dims" or not isinstance(popularity, str)):
        raise ConfigError(f"{where}: popularity_from (a model directory) goes with model = \"random:qwen-dims\"")
    if popularity and not ((path.parent / popularity).resolve() / "config.json").is_file():
        raise ConfigError(f"{where}: popularity_from {popularity!r} is not a model directory (no config.json)")
    return Scenario(raw.get("name", path.stem), model, path, int(_number(where, raw, "seed", 0, strict=False)),
                    float(_number(where, raw, "duration_s", 60.0)), int(_number(where, raw, "max_prompt_tokens", 128)),
                    int(_number(where, raw, "max_output_tokens", 32)), int(_number(where, raw, "random_layers", 2)),
                    raw.get("baseline_dtype", "float32"), tuple(tenants), tuple(deployments), popularity)
