"""CacheBlend for the embedded engine: a prompt's KV from stored chunk KV + selective recompute.

Data flow for one call:

    segments.segment_call(call)   -> SegmentedPrompt: token ids + prefix/chunk/glue/suffix spans
    Blender.gather(prompt)        -> ReusedKV: each reused segment's stored KV (KVStore: RAM,
                                     disk, or computed now and stored), laid out over the prompt
    Blender.blend(prompt, config) -> BlendResult: per-layer KV of every token (post-RoPE, as a
                                     DynamicCache) and the last token's logits, for decoding

Owners: `segments` decides what is reusable, `KVStore` keeps tensors, `LayerwiseModel`
(blend_forward.py) does the math, this module wires them and times the phases. A segment's
KV is computed by prefilling it alone after its context (the prompt prefix for a chunk,
nothing for the prefix itself) at positions from 0, keeping keys before RoPE.

With ratio 1 a blend is a full prefill; with ratio 0 it is full KV reuse (every reused
token keeps its stored KV from the check layer on; glue and suffix are computed over it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from ragserve.config import BlendConfig
from ragserve.domain import Chunk
from ragserve.engines.local.blend_forward import BlendUnsupported, ForwardOut, LayerwiseModel, ReusedKV
from ragserve.engines.local.kv_store import ChunkKV, KVSpec, KVStore, segment_key
from ragserve.engines.local.runner import BatchKV
from ragserve.engines.local.segments import CHUNK, Segment, SegmentedPrompt, segment_call
from ragserve.synthesis import answer_call

logger = logging.getLogger(__name__)

__all__ = ["Blender", "BlendResult", "GatherStats", "BlendUnsupported", "as_batch", "forced_tokens",
           "kv_spec", "precompute_chunks", "to_cache"]


@dataclass
class GatherStats:
    """Where a prompt's reused segments came from and how long fetching them took."""

    num_ram: int = 0
    num_disk: int = 0
    num_computed: int = 0
    load_s: float = 0.0      # store lookups: RAM hits, disk reads and their checks
    compute_s: float = 0.0   # prefills of segments missing from both tiers
    layout_s: float = 0.0    # laying segment KV out over the prompt and rotating the keys


@dataclass
class BlendResult:
    cache: DynamicCache          # per layer keys/values [1, H_kv, T, D], post-RoPE
    logits: torch.Tensor         # [V] float32, last prompt token
    num_tokens: int
    num_reused: int              # tokens whose KV came from the store
    num_recomputed: int          # tokens computed past the last check layer (fresh + selected)
    num_active: list[tuple[int, int]] = field(default_factory=list)   # (check layer, tokens kept)
    compute_fraction: float = 1.0   # token-layers computed / a full prefill's
    gather: GatherStats = field(default_factory=GatherStats)
    compute_s: float = 0.0       # the layer-wise forward


def kv_spec(model: torch.nn.Module, model_id: str) -> KVSpec:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVSpec(model_id=model_id, dtype=next(model.parameters()).dtype, num_layers=cfg.num_hidden_layers,
                  num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim)


def to_cache(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


class Blender:
    """Builds prompt KV from a `KVStore` and a loaded model. Not thread-safe: one caller
    (the engine's worker thread) at a time."""

    def __init__(self, model: torch.nn.Module, store: KVStore) -> None:
        self.lw = LayerwiseModel(model)
        self.store = store
        want = kv_spec(model, store.spec.model_id)
        if want != store.spec:
            raise ValueError(f"KV store spec {store.spec} does not match the model's {want}")

    # -- segment KV -------------------------------------------------------------------
    def compute_segment(self, context: tuple[int, ...], ids: tuple[int, ...]) -> ChunkKV:
        """Prefill `context + ids` alone from position 0; the KV of `ids`, keys pre-RoPE."""
        out = self.lw.run(context + ids, keep_pre_rope=True, logits=False)
        assert out.pre_rope_keys is not None
        n = len(context)
        keys = torch.cat([k[:, :, n:] for k in out.pre_rope_keys])     # [L, H_kv, len(ids), D]
        values = torch.cat([v[:, :, n:] for v in out.values])          # [L, H_kv, len(ids), D]
        return ChunkKV(keys.contiguous(), values.contiguous())

    def segment_kv(self, prompt: SegmentedPrompt, seg: Segment, stats: GatherStats) -> ChunkKV:
        context, ids = prompt.context(seg), prompt.ids(seg)
        key = segment_key(self.store.spec.model_id, context, ids)
        t0 = time.perf_counter()
        kv, source = self.store.lookup(key, len(ids))
        stats.load_s += time.perf_counter() - t0
        if kv is not None:
            if source == "ram":
                stats.num_ram += 1
            else:
                stats.num_disk += 1
            return kv
        t0 = time.perf_counter()
        kv = self.compute_segment(context, ids)
        stats.compute_s += time.perf_counter() - t0
        stats.num_computed += 1
        self.store.put(key, kv)
        return kv

    def precompute(self, prompt: SegmentedPrompt) -> GatherStats:
        """Make sure every reused segment of `prompt` is stored (ingest / warm-up)."""
        stats = GatherStats()
        for seg in prompt.segments:
            if seg.reused:
                self.segment_kv(prompt, seg, stats)
        return stats

    def gather(self, prompt: SegmentedPrompt) -> tuple[ReusedKV, GatherStats]:
        """Stored KV of every reused segment, laid out at its place in the prompt with keys
        rotated to their positions there."""
        stats = GatherStats()
        parts = [(seg, self.segment_kv(prompt, seg, stats)) for seg in prompt.segments if seg.reused]
        t0 = time.perf_counter()
        spec, T = self.store.spec, len(prompt)
        shape = (spec.num_layers, spec.num_kv_heads, T, spec.head_dim)
        keys = torch.zeros(shape, dtype=spec.dtype, device=self.lw.device)
        values = torch.zeros(shape, dtype=spec.dtype, device=self.lw.device)
        reused = torch.zeros(T, dtype=torch.bool, device=self.lw.device)
        for seg, kv in parts:
            keys[:, :, seg.start:seg.end] = kv.keys
            values[:, :, seg.start:seg.end] = kv.values
            reused[seg.start:seg.end] = True
        keys = self.lw.place(keys, torch.arange(T, device=self.lw.device))
        stats.layout_s = time.perf_counter() - t0
        return ReusedKV(keys, values, reused), stats

    # -- blending ----------------------------------------------------------------------
    def blend(self, prompt: SegmentedPrompt, config: BlendConfig,
              reused: ReusedKV | None = None) -> BlendResult:
        """Prefill `prompt` reusing stored KV, recomputing `config.ratio` of the reused tokens.

        `reused` (consumed: its tensors become the cache) skips `gather`; benchmarks pass
        a clone to time loading separately.
        """
        gather = GatherStats()
        if reused is None:
            reused, gather = self.gather(prompt)
        t0 = time.perf_counter()
        reused.forced = forced_tokens(prompt, config.sink_tokens, config.boundary_tokens, self.lw.device)
        out = self.lw.run(prompt.token_ids, reused, config.schedule(), deviation=config.deviation,
                          deviation_mass=config.deviation_mass)
        result = self._result(prompt, out, reused.num_reused, gather)
        result.compute_s = time.perf_counter() - t0
        logger.debug("blended %d tokens (%d reused, %d recomputed, %.0f%% of a prefill's work) in %.3fs",
                     result.num_tokens, result.num_reused, result.num_recomputed,
                     100 * result.compute_fraction, result.compute_s)
        return result

    def full(self, prompt: SegmentedPrompt) -> BlendResult:
        """A plain prefill through the same layer-wise forward (the r = 100% reference)."""
        t0 = time.perf_counter()
        out = self.lw.run(prompt.token_ids)
        result = self._result(prompt, out, 0, GatherStats())
        result.compute_s = time.perf_counter() - t0
        return result

    def _result(self, prompt: SegmentedPrompt, out: ForwardOut, num_reused: int,
                gather: GatherStats) -> BlendResult:
        assert out.logits is not None
        T, L = len(prompt), self.lw.num_layers
        last = out.num_active[-1][1] if out.num_active else T
        return BlendResult(cache=to_cache(out.keys, out.values), logits=out.logits, num_tokens=T,
                           num_reused=num_reused, num_recomputed=last, num_active=out.num_active,
                           compute_fraction=out.token_layers / (T * L), gather=gather)


def forced_tokens(prompt: SegmentedPrompt, num_first: int, num_last: int,
                  device: torch.device | str = "cpu") -> torch.Tensor | None:
    """[T] bool: each chunk's first `num_first` and last `num_last` tokens (always
    recomputed), or None when both are 0."""
    if num_first <= 0 and num_last <= 0:
        return None
    forced = torch.zeros(len(prompt), dtype=torch.bool, device=device)
    for seg in prompt.segments:
        if seg.kind == CHUNK:
            forced[seg.start:min(seg.end, seg.start + num_first)] = True
            forced[max(seg.start, seg.end - num_last):seg.end] = True
    return forced


def precompute_chunks(blender: Blender, tokenizer: Any, chunks: Sequence[Chunk],
                      steerer: Any = None) -> GatherStats:
    """Store the KV of `chunks` (and of the answer prompt's prefix) before any query
    (`ragserve ingest --precompute-kv`); with a `Steerer`, also each chunk's LLMSteer scores.
    Each chunk goes through a one-chunk answer prompt, so its ids and context are exactly
    those `segment_call` gives it inside a real prompt."""
    total = GatherStats()
    for chunk in chunks:
        prompt = segment_call(tokenizer, answer_call("?", [chunk], max_tokens=1))
        if prompt is None:
            continue
        stats = blender.precompute(prompt)
        if steerer is not None:
            steerer.precompute(prompt)
        total.num_ram += stats.num_ram
        total.num_disk += stats.num_disk
        total.num_computed += stats.num_computed
        total.load_s += stats.load_s
        total.compute_s += stats.compute_s
    return total


def as_batch(result: BlendResult) -> tuple[BatchKV, torch.Tensor]:
    """A blended prefill as the engine's running-batch KV (one row, no padding) + logits [1, V]."""
    device = result.logits.device
    mask = torch.ones((1, result.num_tokens), dtype=torch.long, device=device)
    positions = torch.tensor([result.num_tokens], dtype=torch.long, device=device)
    return BatchKV(result.cache, mask, positions), result.logits.view(1, -1)
