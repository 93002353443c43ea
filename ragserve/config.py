"""Settings. Environment variables are read here and nowhere else.

| env var            | default                       | meaning                                |
|--------------------|-------------------------------|----------------------------------------|
| RAGSERVE_DATA      | ~/.local/share/ragserve       | collections (index + docstore), KV store |
| RAGSERVE_CACHE     | ~/.cache/ragserve             | converted model weights                 |
| RAGSERVE_DATASETS  | <repo>/../shared/datasets     | evaluation datasets                     |
| RAGSERVE_MODEL     | smollm2                       | default serving model                   |
| RAGSERVE_THREADS   | (torch default)               | CPU threads for the embedded engine     |
| RAGSERVE_DTYPE     | (auto)                        | bf16/fp16/fp32; auto = bf16 on GPUs and CPUs with native bf16, else fp32 |
| RAGSERVE_API_KEYS  | (none)                        | comma-separated API keys of the HTTP server, added to server.api_keys |

A config file is YAML (any suffix) or TOML (`.toml`); both hold the sections below, e.g.

    server:                 # TOML: [server]
      port: 8080
      api_keys: [k1]
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from ragserve.errors import ConfigError
from ragserve.prompts import ANSWER_SYSTEMS

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("RAGSERVE_DATA") or Path.home() / ".local/share/ragserve")


def cache_dir() -> Path:
    return Path(os.environ.get("RAGSERVE_CACHE") or Path.home() / ".cache/ragserve")


def datasets_dir() -> Path:
    return Path(os.environ.get("RAGSERVE_DATASETS") or _REPO_ROOT.parent / "shared/datasets")


def default_model() -> str:
    return os.environ.get("RAGSERVE_MODEL", "smollm2")


def dtype_override() -> str | None:
    """RAGSERVE_DTYPE: bf16 | fp16 | fp32 for the embedded engine; unset = best for the device."""
    value = os.environ.get("RAGSERVE_DTYPE") or None
    if value not in (None, "bf16", "fp16", "fp32"):
        raise ConfigError(f"RAGSERVE_DTYPE={value!r}; use bf16, fp16 or fp32")
    return value


def num_threads() -> int | None:
    value = os.environ.get("RAGSERVE_THREADS")
    return int(value) if value else None


def api_keys_from_env() -> tuple[str, ...]:
    """RAGSERVE_API_KEYS, comma-separated; blanks are ignored."""
    return tuple(k.strip() for k in os.environ.get("RAGSERVE_API_KEYS", "").split(",") if k.strip())


STORES = ("faiss", "milvus")


@dataclass(frozen=True)
class MilvusConfig:
    """Where the Milvus vector store lives (used when retrieval.store is milvus)."""

    uri: str = ""
    """A path ending in .db = Milvus Lite, embedded in this process (one process per file);
    http(s)://host:19530 = a Milvus server or cluster. "" = Milvus Lite at <data dir>/milvus.db."""
    token: str | None = None
    """Server credentials, "user:password" or an API key; None for Milvus Lite or an open server."""
    db_name: str = ""
    """Database on the server; "" = its default database."""
    collection_prefix: str = "ragserve_"
    """Prefix of the Milvus collections ragserve creates (several deployments can share a server)."""
    index_type: str = "FLAT"
    """Vector index: FLAT (exact, as the FAISS store) or a server index such as HNSW, IVF_FLAT, AUTOINDEX."""
    index_params: dict[str, Any] = field(default_factory=dict)
    """Build parameters of index_type, e.g. {M: 16, efConstruction: 200} for HNSW."""
    search_params: dict[str, Any] = field(default_factory=dict)
    """Search parameters of index_type, e.g. {ef: 64} for HNSW, {nprobe: 16} for IVF_FLAT."""
    timeout_s: float = 60.0
    """Per-call timeout of the Milvus client."""

    def __post_init__(self) -> None:
        uri = self.uri
        if not isinstance(uri, str) or not (uri == "" or uri.endswith(".db") or
                                            uri.startswith(("http://", "https://", "tcp://", "unix:"))):
            raise ConfigError(f"retrieval.milvus.uri={uri!r}: use a local path ending in .db (Milvus Lite) "
                              "or http://HOST:19530 (a Milvus server); empty = <data dir>/milvus.db")
        if not isinstance(self.collection_prefix, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,32}",
                                                                             self.collection_prefix):
            raise ConfigError(f"retrieval.milvus.collection_prefix={self.collection_prefix!r}: use up to 33 "
                              "letters, digits and '_', starting with a letter or '_'")
        if not isinstance(self.index_params, dict) or not isinstance(self.search_params, dict):
            raise ConfigError("retrieval.milvus.index_params and search_params must be mappings")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError(f"retrieval.milvus.timeout_s={self.timeout_s!r} must be a number > 0")

    def resolved_uri(self) -> str:
        return self.uri or str(data_dir() / "milvus.db")


BACKENDS = ("local", "vllm")   # engine.backend: the embedded engine, or vLLM servers (runtime.build_runtime)


@dataclass(frozen=True)
class RetrievalConfig:
    chunk_tokens: int = 256
    """Chunk size in the serving model's tokens."""
    chunk_overlap_tokens: int = 32
    """Overlap between consecutive chunks of one document, in tokens."""
    embed_batch_size: int = 64
    """Passages embedded per batch at ingest."""
    store: str = "faiss"
    """Vector store of every collection: faiss (files under <data dir>/collections) | milvus
    (Milvus Lite or a Milvus server, see the milvus section)."""
    milvus: MilvusConfig = field(default_factory=MilvusConfig)
    """The Milvus store's settings (read when store is milvus)."""

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1 or self.embed_batch_size < 1:
            raise ConfigError(f"retrieval.chunk_tokens={self.chunk_tokens} and retrieval.embed_batch_size="
                              f"{self.embed_batch_size} must be >= 1")
        if not 0 <= self.chunk_overlap_tokens < self.chunk_tokens:
            raise ConfigError(f"retrieval.chunk_overlap_tokens={self.chunk_overlap_tokens} must be in "
                              f"[0, chunk_tokens={self.chunk_tokens})")
        if self.store not in STORES:
            raise ConfigError(f"retrieval.store={self.store!r} must be one of: {', '.join(STORES)}")
        if isinstance(self.milvus, dict):   # from a config file
            allowed = {f.name for f in fields(MilvusConfig)}
            unknown = sorted(set(self.milvus) - allowed)
            if unknown:
                raise ConfigError(f"unknown config key retrieval.milvus.{unknown[0]}; known: "
                                  f"{', '.join(sorted(allowed))}")
            object.__setattr__(self, "milvus", MilvusConfig(**self.milvus))
        elif not isinstance(self.milvus, MilvusConfig):
            raise ConfigError(f"retrieval.milvus must be a mapping, got {self.milvus!r}")


QUANTIZATIONS = ("none", "int8", "int4")   # the embedded engine's weight formats


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "local"
    """Which engine runs LLM calls: local (embedded transformers) | vllm (see the vllm section)."""
    model: str = field(default_factory=default_model)
    """Serving model name in the registry: smollm2 | qwen."""
    kv_budget_mb: float = 512.0
    """KV memory the embedded engine may hold for in-flight calls; sets its token capacity."""
    max_batch_size: int = 16
    """Most calls decoded together in one batch."""
    max_context_tokens: int = 8192
    """Longest prompt + output accepted for one call."""
    quantization: str = "none"
    """Weights of the embedded engine's linear layers: none | int8 (per-channel, weight-only) |
    int4 (group-wise). Quantized once at the first start and cached beside the model."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"engine.quantization={self.quantization!r} must be one of: "
                              f"{', '.join(QUANTIZATIONS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"engine.backend={self.backend!r} unknown; use one of: {', '.join(BACKENDS)}")
        if not self.kv_budget_mb > 0:
            raise ConfigError(f"engine.kv_budget_mb={self.kv_budget_mb} must be > 0")
        if self.max_batch_size < 1 or self.max_context_tokens < 1:
            raise ConfigError(f"engine.max_batch_size={self.max_batch_size} and engine.max_context_tokens="
                              f"{self.max_context_tokens} must be >= 1")


@dataclass(frozen=True)
class SynthesisConfig:
    answer_tokens: int = 64
    """Cap on the final answer's length."""
    default_intermediate_tokens: int = 64
    """Summary cap for map_reduce/refine when the plan gives none."""
    answer_stop: tuple[str, ...] = ("\n",)
    """Answers end at these strings (short-answer QA); set [] for multi-line summaries."""
    answer_style: str = "short"
    """short: a phrase copied from the context (factoid QA) | summary: two to four sentences
    (query-focused summaries; pair it with answer_stop: [] and a larger answer_tokens)."""

    def __post_init__(self) -> None:
        if self.answer_tokens < 1 or self.default_intermediate_tokens < 1:
            raise ConfigError(f"synthesis.answer_tokens={self.answer_tokens} and synthesis.default_intermediate_tokens="
                              f"{self.default_intermediate_tokens} must be >= 1")
        object.__setattr__(self, "answer_stop", tuple(self.answer_stop))
        if self.answer_style not in ANSWER_SYSTEMS:
            raise ConfigError(f"synthesis.answer_style={self.answer_style!r} must be one of: {', '.join(ANSWER_SYSTEMS)}")


@dataclass(frozen=True)
class MetisConfig:
    policy: str = "fcfs"
    """Order of queries waiting for KV: fcfs (head blocks, no starvation) | sjf (cheapest first)."""
    rules_file: str | None = None
    """YAML file with planner rules (see ragserve/metis/rules.py); None = METIS Algorithm 1."""
    offer_refine: bool | None = None
    """Offer refine wherever map_reduce is offered (not in METIS' default rules). None = the
    rules file's value, else false. Set here and in the rules file, both must agree."""
    confidence_threshold: float | None = None
    """Below this profiler confidence, plan over the union of the last 10 pruned spaces. None =
    the rules file's value, else 0.9 (PlannerRules). Set here and in the rules file, both must agree."""
    feedback_every: int = 30
    """Run the golden plan and ask the profiler for feedback every N queries; 0 = off."""
    max_waiting: int = 256
    """Queries waiting for KV beyond this are rejected (HTTP 503 + server.retry_after_s); 0 =
    unlimited. Behind the HTTP server, server.max_queue (queries in flight) binds first."""
    learned_profiler: str | None = None
    """Path of a learned profiler (ragserve tune train-profiler); None = the LLM profiler."""
    descriptions: dict[str, str] = field(default_factory=dict)
    """One-line description per collection for the profiler; default is derived from titles."""
    profiler_endpoint: VllmEndpoint | None = None
    """Run the LLM profiler on this OpenAI-compatible endpoint ({base_url, model[, api_key]}, e.g.
    a larger model on vLLM) instead of the serving engine. None = the serving engine."""

    def __post_init__(self) -> None:
        # The scheduler and the rules own these values; they are imported here, where they are
        # checked, so that the settings module stays a leaf for everything else.
        from ragserve.metis.rules import PlannerRules
        from ragserve.metis.scheduler import Policy

        policies = [p.value for p in Policy]
        if self.policy not in policies:
            raise ConfigError(f"metis.policy={self.policy!r} unknown; use one of: {', '.join(policies)}")
        if self.feedback_every < 0 or self.max_waiting < 0:
            raise ConfigError(f"metis.feedback_every={self.feedback_every} and metis.max_waiting="
                              f"{self.max_waiting} must be >= 0")
        if self.learned_profiler and not Path(self.learned_profiler).is_dir():
            raise ConfigError(f"metis.learned_profiler={self.learned_profiler!r} is not a directory; train one "
                              "with: ragserve tune train-profiler profiles/<model>/<dataset>")
        PlannerRules.from_config(self)   # the rules file parses and agrees with this section


PLANNERS = ("auto", "tuned", "metis")


@dataclass(frozen=True)
class TunedConfig:
    """The tuned controller (ragserve/tuned.py) and its decision rule (ragserve/decide.py)."""

    planner: str = "auto"
    """Who plans queries without a fixed plan: auto (tuned where the collection has a quality
    model, METIS' rules elsewhere) | tuned (same as auto) | metis (METIS everywhere)."""
    models: dict[str, str] = field(default_factory=dict)
    """Quality model directory per collection; default <collection dir>/quality when present."""
    time_value: float = 0.01
    """Quality (0-1 points) given up for one second of service on an idle engine; under load a
    second costs (1 + backlog / cheapest service) times as much."""
    slack: float = 2.0
    """Without an SLO the latency budget is the cheapest candidate's predicted completion x slack."""
    tie: float = 0.005
    """Scores closer than this are a tie, broken toward the faster plan."""

    def __post_init__(self) -> None:
        if self.planner not in PLANNERS:
            raise ConfigError(f"tuned.planner={self.planner!r} must be one of: {', '.join(PLANNERS)}")
        if not isinstance(self.models, dict):
            raise ConfigError(f"tuned.models must map collection names to directories, got {self.models!r}")
        if not isinstance(self.time_value, (int, float)) or self.time_value < 0:
            raise ConfigError(f"tuned.time_value={self.time_value!r} must be a number >= 0")
        if not isinstance(self.slack, (int, float)) or self.slack < 1:
            raise ConfigError(f"tuned.slack={self.slack!r} must be a number >= 1 (1 = always the cheapest plan)")
        if not isinstance(self.tie, (int, float)) or self.tie < 0:
            raise ConfigError(f"tuned.tie={self.tie!r} must be a number >= 0")


@dataclass(frozen=True)
class BlendConfig:
    """CacheBlend in the embedded engine: reuse stored chunk KV, recompute a few tokens."""

    enabled: bool = False
    """Prefill answer calls (stuff, reduce, first refine step) from stored chunk KV."""
    ratio: float = 0.15
    """Share r of the reused tokens recomputed after the check layer(s), in [0, 1]. The
    glue and question tokens are always computed; 1.0 equals a full prefill, 0 (with
    sink_tokens 0) full reuse."""
    check_layers: tuple[int, ...] = ()
    """Layers (>= 1) where reused and fresh keys are compared to pick the tokens to recompute.
    Empty: (1,) for mode single, (1, 2, 3, 4) for mode gradual."""
    mode: str = "single"
    """single: one check layer picks r (LMCache). gradual: the kept share falls linearly from
    min(1, 2r) at the first check layer to r at the last (the paper's gradual filtering)."""
    deviation: str = "key"
    """What the check layer compares, reused vs fresh: "key" (LMCache) or "value"."""
    sink_tokens: int = 4
    """Always recompute each chunk's first this-many tokens (EPIC, arXiv 2410.15332: an
    independently encoded chunk's opening tokens act as a misleading attention sink). Taken
    from the `ratio` budget. 4 gains +0.015 +- 0.012 F1 over 0 at the same TTFT (Qwen, r=15%,
    300 paired questions, eval/results/bench_blend_r15_squad+2wiki.md); 0 is LMCache's selection."""
    boundary_tokens: int = 0
    """Always recompute each chunk's last this-many tokens (where it meets the next one)."""
    deviation_mass: float = 0.0
    """In (0, 1]: a per-prompt ratio, at most `ratio`: recompute the fewest tokens whose key
    deviation covers this share of the total. 0 recomputes exactly `ratio`."""
    min_tokens: int = 256
    """Prefill normally when a call's chunks hold fewer tokens than this."""
    ram_budget_mb: float = 1024.0
    """RAM tier of the chunk KV store; the disk tier lives under <data dir>/kv/<model id>."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "check_layers", tuple(int(x) for x in self.check_layers))
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"blend.ratio={self.ratio} must be in [0, 1]")
        if self.mode not in ("single", "gradual"):
            raise ConfigError(f"blend.mode={self.mode!r} must be 'single' or 'gradual'")
        if self.deviation not in ("key", "value"):
            raise ConfigError(f"blend.deviation={self.deviation!r} must be 'key' or 'value'")
        if any(x < 1 for x in self.check_layers) or len(set(self.check_layers)) != len(self.check_layers):
            raise ConfigError(f"blend.check_layers={list(self.check_layers)} must be distinct layers >= 1")
        if self.mode == "single" and len(self.check_layers) > 1:
            raise ConfigError(f"blend.check_layers={list(self.check_layers)}: mode single takes one "
                              "layer; use mode gradual for several")
        if self.sink_tokens < 0 or self.boundary_tokens < 0:
            raise ConfigError(f"blend.sink_tokens={self.sink_tokens} and blend.boundary_tokens="
                              f"{self.boundary_tokens} must be >= 0")
        if not 0.0 <= self.deviation_mass <= 1.0:
            raise ConfigError(f"blend.deviation_mass={self.deviation_mass} must be in [0, 1]")
        if self.min_tokens < 0 or self.ram_budget_mb < 0:
            raise ConfigError(f"blend.min_tokens={self.min_tokens} and blend.ram_budget_mb="
                              f"{self.ram_budget_mb} must be >= 0")

    def schedule(self) -> list[tuple[int, float]]:
        """(check layer, share of reused tokens kept from that layer on), in layer order."""
        if self.mode == "single":
            return [((self.check_layers or (1,))[0], self.ratio)]
        layers = sorted(self.check_layers or (1, 2, 3, 4))
        first = min(1.0, 2 * self.ratio)
        n = len(layers)
        return [(layer, first + (self.ratio - first) * (i / (n - 1) if n > 1 else 1.0))
                for i, layer in enumerate(layers)]


@dataclass(frozen=True)
class SteerConfig:
    """LLMSteer (arXiv 2411.13009) in the embedded engine: answer calls attend more to each
    chunk's important tokens, chosen once per chunk without the query (see engines/local/steer.py).
    Defaults: the best of a 16-point sweep on SmolLM2 / 10 SQuAD questions
    (eval/results/bench_steer_sweep_squad_smollm2.md); steering every layer or alpha 5 hurt there.
    On Qwen 0.5B no k/alpha setting helped (bench_steer_sweep_squad_qwen_knobs.md), so it is off
    by default."""

    enabled: bool = False
    """Steer every call over chunks (stuff, reduce, map_rerank, first refine step). A query's
    `steer` flag overrides this; other engines ignore it."""
    collections: tuple[str, ...] = ()
    """Collections whose queries are steered when the query does not say (as `enabled`, per collection)."""
    top_fraction: float = 0.2
    """Per chunk and layer, each of the two query-free passes keeps its top k = ceil(top_fraction
    * chunk tokens) tokens by attention received; the steering set is their intersection."""
    alpha: float = 2.0
    """Attention weights of the question and answer tokens toward steered tokens are multiplied
    by alpha, then renormalized (log alpha added to their pre-softmax scores). 1 = no change."""
    layers: str = "0.5:"
    """Steered layers: all | START:END, a slice of layer indices (negatives count from the end;
    values with a dot are fractions of the depth, e.g. 0.5: = the upper half) | i,j,k."""
    score: str = "mean"
    """How a token's importance is read from the attention it receives: sum (over the queries,
    as the paper) | mean (per query that can see it: removes the causal bias toward a chunk's
    first tokens, usually its title)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "collections", tuple(self.collections))
        if self.score not in ("sum", "mean"):
            raise ConfigError(f"steer.score={self.score!r} must be 'sum' or 'mean'")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(f"steer.top_fraction={self.top_fraction} must be in (0, 1]")
        if not self.alpha > 0:
            raise ConfigError(f"steer.alpha={self.alpha} must be > 0")
        self.layer_indices(1000)   # a syntax check; the model's depth is known at engine start

    def steers(self, collection: str) -> bool:
        """Whether queries of `collection` are steered when they do not say."""
        return self.enabled or collection in self.collections

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The steered layers of a model with `num_layers` layers, ascending."""
        spec = str(self.layers).strip().replace(" ", "")

        def bound(text: str, default: int) -> int:
            if not text:
                return default
            value = float(text) * num_layers if "." in text else int(text)
            value = int(round(value))
            return value + num_layers if value < 0 else value

        try:
            if spec == "all":
                picked = range(num_layers)
            elif ":" in spec:
                start, end = spec.split(":")
                picked = range(max(0, bound(start, 0)), min(num_layers, bound(end, num_layers)))
            else:
                picked = [bound(x, 0) for x in spec.split(",")]
        except ValueError:
            raise ConfigError(f"steer.layers={self.layers!r}: use all, START:END or i,j,k") from None
        out = tuple(sorted(set(picked)))
        if not out or any(not 0 <= i < num_layers for i in out):
            raise ConfigError(f"steer.layers={self.layers!r} selects {list(out)}, not layers of a "
                              f"{num_layers}-layer model")
        return out


@dataclass(frozen=True)
class VllmEndpoint:
    base_url: str
    """e.g. http://127.0.0.1:8001 (the server's root; /v1 is added by the client)."""
    model: str
    """The model name the server serves (its --served-model-name or --model)."""
    api_key: str | None = None
    """Bearer token, when the server was started with --api-key."""
    lmcache_blend: bool = False
    """The server runs LMCache with blending: send chunks separated by blend_special_str."""
    blend_special_str: str = " # # "
    """LMCache's chunk separator; must equal the server's LMCACHE_BLEND_SPECIAL_STR."""


@dataclass(frozen=True)
class VllmConfig:
    endpoints: tuple[VllmEndpoint, ...] = ()
    """One or more vLLM replicas; each job goes to the one with the most free KV."""
    scrape_interval_s: float = 1.0
    """How often each endpoint's /metrics is scraped in the background."""
    max_staleness_s: float = 5.0
    """A load snapshot older than this is refreshed before a decision."""
    timeout_s: float = 300.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries (with backoff) of a call that failed before any token arrived."""
    retry_backoff_s: float = 0.25
    """First retry delay; it doubles per retry (capped at 4 s), plus up to 25% jitter."""
    retry_buffered: bool = True
    """Re-run a generate() call whose connection broke after tokens arrived: none of them had
    reached the caller (its text is returned whole). stream() calls are never retried once a
    piece was yielded."""
    connect_timeout_s: float = 5.0
    """TCP connect timeout per request; a refused or silent endpoint fails over after it."""
    scrape_timeout_s: float = 2.0
    """Timeout of one /metrics or /health request."""
    hf_config: str | None = None
    """Hugging Face config.json (or its directory) of the served model, for the KV size per
    token. Default: the /v1/models root when it is a local directory, else ragserve's
    registry copy of a model of that name (e.g. smollm2)."""
    num_layers: int | None = None
    """Override of the served model's layer count (when no config.json is at hand)."""
    num_kv_heads: int | None = None
    """Override of the served model's KV head count."""
    head_dim: int | None = None
    """Override of the served model's head dimension."""
    dtype_bytes: int | None = None
    """Override of the KV cache's bytes per value (2 for fp16/bf16, 4 for fp32, 1 for fp8).
    Default: from the server's explicit KV size when it reports one, else config.json's dtype."""

    def __post_init__(self) -> None:
        for name in ("scrape_interval_s", "max_staleness_s", "timeout_s", "connect_timeout_s", "scrape_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vllm.{name}={getattr(self, name)} must be > 0")
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ConfigError(f"vllm.max_retries={self.max_retries} and vllm.retry_backoff_s="
                              f"{self.retry_backoff_s} must be >= 0")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Listen address; loopback by default."""
    port: int = 8000
    """Listen port."""
    api_keys: tuple[str, ...] = ()
    """Accepted API keys (also RAGSERVE_API_KEYS, comma-separated). Writes always need one."""
    require_key_for_queries: bool = False
    """Also require a key for queries."""
    max_queue: int = 64
    """Queries in flight or waiting beyond this get 503 + Retry-After."""
    request_timeout_s: float = 300.0
    """A query running longer is cancelled with 504."""
    max_body_bytes: int = 32 * 2**20
    """Request bodies above this get 413."""
    max_ingest_queue: int = 4
    """Ingest requests running or waiting for their collection beyond this get 503 + Retry-After."""
    retry_after_s: float = 2.0
    """Retry-After sent with a 503 (seconds, rounded up)."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM, in-flight requests get this long to finish before they are cut."""
    max_connections: int = 1024
    """Open connections beyond this are refused by uvicorn (a last guard against pile-ups)."""
    access_log: bool = False
    """Log one line per request (uvicorn's access log)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ConfigError("server.api_keys must be non-empty strings")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"server.port={self.port!r} must be an integer in [1, 65535]")
        for name in ("max_queue", "max_body_bytes", "max_ingest_queue", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"server.{name}={value!r} must be an integer >= 1")
        for name in ("request_timeout_s", "retry_after_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"server.{name}={value!r} must be a number > 0")

    def with_env(self) -> "ServerConfig":
        """These settings plus the keys of RAGSERVE_API_KEYS."""
        extra = tuple(k for k in api_keys_from_env() if k not in self.api_keys)
        return replace(self, api_keys=self.api_keys + extra) if extra else self


def _endpoint(where: str, ep: Any) -> VllmEndpoint:
    allowed = {f.name for f in fields(VllmEndpoint)}
    if not isinstance(ep, dict) or not {"base_url", "model"} <= ep.keys() or not ep.keys() <= allowed:
        raise ConfigError(f"{where} = {ep!r}: needs base_url and model; "
                          f"allowed keys: {', '.join(sorted(allowed))}")
    return VllmEndpoint(**ep)


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(section: str, key: str, value: Any, annotation: str) -> None:
    """A file's value has the field's type (YAML/TOML give ints, floats, bools, strings,
    lists); the field's own checks then judge its range."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in options:
            return
        raise ConfigError(f"config key {section}.{key} must not be null")
    for option in options:
        if option in _SCALARS:
            if isinstance(value, _SCALARS[option]) and not (isinstance(value, bool) and option != "bool"):
                return
        elif option.startswith("tuple["):
            inner = option[len("tuple["):].split(",")[0].strip()
            if isinstance(value, tuple) and (inner not in _SCALARS or all(
                    isinstance(v, _SCALARS[inner]) and not isinstance(v, bool) for v in value)):
                return
        elif option.startswith("dict[") and isinstance(value, dict):
            return
        elif option not in ("None",) and not option.startswith(("tuple[", "dict[")):
            return   # a dataclass field (endpoints), checked by its coercion
    raise ConfigError(f"config key {section}.{key}={value!r} must be {annotation}")


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--set SECTION.KEY=VALUE` items as a config mapping; VALUE is read as YAML (512, true,
    [a, b], null, or a string)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ConfigError(f"--set {item!r} is not SECTION.KEY=VALUE (e.g. --set metis.policy=sjf)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        out.setdefault(section, {})[name] = value
    return out


def _coerce(section: str, key: str, value: Any) -> Any:
    """YAML gives lists and dicts; frozen settings hold tuples and dataclasses."""
    if section == "vllm" and key == "endpoints":
        if not isinstance(value, list):
            raise ConfigError(f"vllm.endpoints must be a list of {{base_url, model}} mappings, got {value!r}")
        return tuple(_endpoint(f"vllm.endpoints[{i}]", ep) for i, ep in enumerate(value))
    if section == "metis" and key == "profiler_endpoint":
        return None if value is None else _endpoint("metis.profiler_endpoint", value)
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Config:
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    metis: MetisConfig = field(default_factory=MetisConfig)
    tuned: TunedConfig = field(default_factory=TunedConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Build from nested dicts (a parsed YAML/TOML file). Unknown keys are an error."""
        sections: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for name, value in raw.items():
            if name not in known:
                raise ConfigError(f"unknown config section {name!r}; known: {', '.join(known)}")
            default = getattr(cls(), name)
            if not isinstance(value, dict):
                raise ConfigError(f"config section {name!r} must be a mapping, got {value!r}")
            allowed = {f.name: f for f in fields(default)}
            for key in value:
                if key not in allowed:
                    raise ConfigError(f"unknown config key {name}.{key}; known: {', '.join(sorted(allowed))}")
            values = {k: _coerce(name, k, v) for k, v in value.items()}
            for key, v in values.items():
                _check_type(name, key, v, str(allowed[key].type))
            sections[name] = replace(default, **values)
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> "Config":
        """The settings of the file at `path` (None = defaults) with `--set` overrides on top,
        every section validated before anything uses them."""
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {str(p)!r} does not exist")
            raw = _parse_file(p)
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
        for section, values in parse_overrides(overrides).items():
            current = raw.get(section)
            if current is not None and not isinstance(current, dict):
                raise ConfigError(f"config section {section!r} must be a mapping, got {current!r}")
            raw[section] = {**(current or {}), **values}
        return cls.from_dict(raw)


def _parse_file(path: Path) -> Any:
    """A YAML file, or TOML when the name ends in .toml."""
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:   # Python 3.10
            raise ConfigError(f"config file {str(path)!r}: TOML needs Python 3.11+; use YAML") from None
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
