"""LLMSteer (arXiv 2411.13009) for the embedded engine: query-independent attention steering.

Data flow:

    selection, once per chunk and without any query (`Steerer.scores`):
        prefill INSTRUCTIONS[i] + the chunk's tokens, for each of the two instructions, with
        the attention function in recording mode -> per layer, the attention each chunk token
        receives (summed over heads and queries) -> scores [2, L, n] float32, kept in the
        chunk KV store next to the chunk's KV (`KVStore.put_extra`, same key).
    steering set, per config (`select`): per layer, the top k = ceil(top_fraction * n) tokens
        of each pass; the set is the intersection of the two passes'.
    steering, per call (`Steerer.row` -> `SteerRow`, then `SteerBatch` per forward):
        on steered layers, the queries of the question and the answer (prompt positions from
        the suffix on) get log(alpha) added to their pre-softmax scores toward the steered keys,
        i.e. those attention weights are scaled by alpha and renormalized.

Only the question and answer tokens are steered: the context's own KV is exactly the
unsteered one, so a chunk's stored KV (CacheBlend) and a prefix cache stay valid, and a
steered call costs an unsteered one plus attention over its last few query rows.

The mechanism is an attention function registered with transformers' `AttentionInterface`
as "ragserve_steer"; `enable(model)` switches a model to it. Without a `steer` argument it
*is* sdpa (it calls transformers' sdpa function), so unsteered calls and layers run as
before. The per-forward state travels as a model kwarg (`steer=SteerBatch`), which
transformers passes down to every attention call; nothing global is mutated per call.
Shapes: B rows, L layers, Q new queries, K keys (cache + new), H heads, D head dim.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ragserve.config import SteerConfig
from ragserve.domain import Chunk
from ragserve.engines.local.kv_store import KVStore, segment_key
from ragserve.engines.local.segments import CHUNK, SUFFIX, SegmentedPrompt, segment_call

logger = logging.getLogger(__name__)

ATTN_NAME = "ragserve_steer"
# Two paraphrased, query-free instructions (the paper's examples): tokens important under both
# are important to the passage itself, not to one wording of the task.
INSTRUCTIONS = ("Answer the question based on the given passages.",
                "Respond to the query using only the provided texts.")
SCORES_VERSION = "1"   # bump when the way scores are computed changes: old entries are ignored


# -- per-forward state ------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerRow:
    """One call's steering: which of its prompt's tokens its question and answer attend more to."""

    keys: torch.Tensor      # [L, T_prompt] bool: steered key positions per layer (none on unsteered layers)
    start: int              # first prompt position whose queries are steered (the question)
    log_alpha: float        # added to the steered pre-softmax scores

    @property
    def num_steered(self) -> int:
        return int(self.keys.any(0).sum())


@dataclass
class SteerBatch:
    """Steering of one forward over a batch (the `steer` kwarg of the model)."""

    keys: torch.Tensor       # [B, L, K] bool: steered key columns per row and layer
    queries: torch.Tensor    # [B, Q - first] bool: steered query rows, from query `first` on
    first: int               # queries before this are steered in no row
    log_alpha: torch.Tensor  # [B] float
    layers: frozenset[int]   # layers with any steered key

    @staticmethod
    def build(rows: Sequence[SteerRow | None], seq_lens: Sequence[int], num_keys: int,
              num_queries: int) -> "SteerBatch | None":
        """Lay `rows` out over a right-aligned batch: row b holds `seq_lens[b]` tokens in the last
        columns of `num_keys` key columns, the last `num_queries` of them being this forward's
        queries. None when no row steers anything (the forward runs plain sdpa)."""
        if not any(r is not None and r.keys.any() for r in rows):
            return None
        B, K, Q = len(rows), num_keys, num_queries
        L = next(r.keys.shape[0] for r in rows if r is not None)
        device = next(r.keys.device for r in rows if r is not None)
        keys = torch.zeros((B, L, K), dtype=torch.bool, device=device)
        queries = torch.zeros((B, Q), dtype=torch.bool, device=device)
        log_alpha = torch.zeros(B, dtype=torch.float32, device=device)
        q_pos = torch.arange(K - Q, K, device=device)           # key column of each query
        for b, (row, n) in enumerate(zip(rows, seq_lens)):
            if row is None:
                continue
            col0 = K - n                                         # column of the row's position 0
            T = row.keys.shape[1]
            keys[b, :, col0:col0 + T] = row.keys
            queries[b] = q_pos - col0 >= row.start
            log_alpha[b] = row.log_alpha
        steered = queries.any(0).nonzero()
        if not len(steered):
            return None
        first = int(steered[0])
        layers = frozenset(int(i) for i in keys.any(dim=(0, 2)).nonzero().flatten())
        return SteerBatch(keys, queries[:, first:], first, log_alpha, layers)

    def bias(self, layer: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive scores [B, 1, Q - first, K] for `layer`, or None when it is not steered."""
        if layer not in self.layers:
            return None
        hit = self.queries[:, :, None] & self.keys[:, layer, None, :]       # [B, Qt, K]
        return (hit.to(dtype) * self.log_alpha.to(dtype).view(-1, 1, 1)).unsqueeze(1)


class AttentionRecorder:
    """Recording mode (the `steer_record` kwarg): explicit softmax weights, and per layer the
    attention each key receives, summed over heads and queries."""

    def __init__(self) -> None:
        self.received: dict[int, torch.Tensor] = {}   # layer -> [K] float32

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None) -> tuple[torch.Tensor, None]:
        groups = getattr(module, "num_key_value_groups", 1)
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)                # [B, H, K, D]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scale   # [B, H, Q, K]
        allowed = _allowed(attention_mask, query.shape[2], k.shape[2], query.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        self.received[module.layer_idx] = weights.sum(dim=(0, 1, 2))           # [K]
        out = torch.matmul(weights.to(v.dtype), v)                             # [B, H, Q, D]
        return out.transpose(1, 2).contiguous(), None                          # [B, Q, H, D]


def _allowed(attention_mask: torch.Tensor | None, num_queries: int, num_keys: int,
             device: torch.device) -> torch.Tensor:
    """Which keys each query may see, [B or 1, 1, Q, K] bool, from sdpa's boolean mask or,
    when sdpa skipped it (is_causal), the causal rule with queries at the last Q columns."""
    if attention_mask is not None:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
            attention_mask.dtype).min / 2
    q_col = torch.arange(num_keys - num_queries, num_keys, device=device).view(-1, 1)
    return (torch.arange(num_keys, device=device).view(1, -1) <= q_col).view(1, 1, num_queries, num_keys)


def steer_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    steer: SteerBatch | None = None, steer_record: AttentionRecorder | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: sdpa, plus steering of the queries `steer` names.

    query [B, H, Q, D], key/value [B, H_kv, K, D]; returns ([B, Q, H, D], None) like sdpa.
    Query rows from `steer.first` on run sdpa with the bias folded into its additive mask, so
    the weights are never materialized; the rows before (the context) run plain sdpa.
    """
    if steer_record is not None:
        return steer_record.attend(module, query, key, value, attention_mask, scaling)
    bias = steer.bias(module.layer_idx, query.dtype) if steer is not None else None
    if bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    kwargs.pop("is_causal", None)   # masks are explicit below; sdpa derives causality from them
    first = steer.first
    Q, K = query.shape[2], key.shape[2]
    parts = []
    if first > 0:   # rows no call steers (the context): sdpa as usual
        if attention_mask is None:   # sdpa skipped the mask: a causal prefill from position 0,
            k, v, head_mask = key[:, :, :first], value[:, :, :first], None   # so these rows see keys < first
        else:
            k, v, head_mask = key, value, attention_mask[:, :, :first]
        parts.append(sdpa_attention_forward(module, query[:, :, :first], k, v, head_mask,
                                            dropout=dropout, scaling=scaling, **kwargs)[0])
    if attention_mask is not None and attention_mask.dtype != torch.bool:   # already additive
        mask = attention_mask[:, :, first:] + bias
    else:
        allowed = _allowed(attention_mask, Q, K, query.device)[:, :, first:]    # [B|1, 1, Qt, K]
        mask = bias.masked_fill(~allowed, torch.finfo(query.dtype).min)         # [B, 1, Qt, K]
    parts.append(sdpa_attention_forward(module, query[:, :, first:], key, value, mask, dropout=dropout,
                                        scaling=scaling, **kwargs)[0])           # [B, Qt, H, D]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def register() -> None:
    """Make "ragserve_steer" a valid `attn_implementation` (sdpa's boolean masks). Idempotent."""
    AttentionInterface.register(ATTN_NAME, steer_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable(model: torch.nn.Module) -> None:
    """Switch `model` to the steering attention (plain sdpa until a forward passes `steer`)."""
    register()
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


# -- selection ------------------------------------------------------------------------------
def select(scores: torch.Tensor, top_fraction: float, score: str = "sum") -> torch.Tensor:
    """The steering set [L, n] bool from scores [P, L, n]: per layer, the tokens in every
    pass's top k = ceil(top_fraction * n). `score` "mean" divides token j's summed attention by
    the n - j chunk queries that can see it (the instruction before the chunk cannot)."""
    P, L, n = scores.shape
    if score == "mean":
        scores = scores / torch.arange(n, 0, -1, dtype=scores.dtype, device=scores.device)
    k = max(1, min(n, math.ceil(top_fraction * n - 1e-9)))
    picked = torch.zeros((P, L, n), dtype=torch.bool, device=scores.device)
    picked.scatter_(2, torch.topk(scores, k, dim=2).indices, True)
    return picked.all(0)


def instruction_prefix(tokenizer: Any, instruction: str) -> tuple[int, ...]:
    """Tokens a chunk is scored after: the answer prompt's prefix (chat template head,
    "Context:\\n[1]") with `instruction` as the system prompt, so the chunk's ids are the
    ones it has in a real prompt."""
    from ragserve.synthesis import answer_call

    probe = segment_call(tokenizer, answer_call("?", [Chunk("x", "x", "x", 1)], 1, system=instruction))
    if probe is None:
        raise ValueError("the chat template does not keep the answer prompt's layout")
    return probe.chunk_context


@dataclass
class SteerCounters:
    steered_calls: int = 0
    steered_tokens: int = 0      # prompt tokens steered toward (any layer), summed over calls
    scored_chunks: int = 0       # chunks whose scores were computed (two prefills each)
    stored_chunks: int = 0       # chunks whose scores came from the store
    score_s: float = 0.0         # time spent computing scores
    failures: int = 0            # calls served unsteered because steering failed

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class Steerer:
    """Builds the steering of a call from stored (or freshly computed) chunk scores. Owns no
    model state beyond switching the model's attention implementation. Not thread-safe: the
    engine's worker thread (or one benchmark loop) calls it."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, store: KVStore, config: SteerConfig,
                 instructions: Sequence[str] = INSTRUCTIONS) -> None:
        enable(model)
        self.model = model
        self.store = store
        self.config = config
        self.num_layers = model.config.num_hidden_layers
        self.layers = config.layer_indices(self.num_layers)
        self.prefixes = [instruction_prefix(tokenizer, text) for text in instructions]
        digest = hashlib.sha256("\x00".join([SCORES_VERSION, *instructions]).encode()).hexdigest()
        self.extra_name = f"steer-{digest[:12]}"
        self.device = next(model.parameters()).device
        self.counters = SteerCounters()

    @torch.inference_mode()
    def compute_scores(self, ids: Sequence[int]) -> torch.Tensor:
        """Attention received by each of `ids` per pass and layer: [len(prefixes), L, n] float32."""
        n, passes = len(ids), []
        for prefix in self.prefixes:
            recorder = AttentionRecorder()
            full = torch.tensor([list(prefix) + list(ids)], dtype=torch.long, device=self.device)
            self.model(input_ids=full, use_cache=False, logits_to_keep=1, steer_record=recorder)
            passes.append(torch.stack([recorder.received[i][-n:] for i in range(self.num_layers)]))
        return torch.stack(passes).float().cpu()                                 # [P, L, n]

    def scores(self, prompt: SegmentedPrompt, seg: Any) -> torch.Tensor:
        """The chunk's scores from the store, computed and stored on a miss."""
        key = segment_key(self.store.spec.model_id, prompt.context(seg), prompt.ids(seg))
        stored = self.store.get_extra(key, self.extra_name)
        if stored is not None and stored.shape == (len(self.prefixes), self.num_layers, seg.num_tokens):
            self.counters.stored_chunks += 1
            return stored
        t0 = time.perf_counter()
        scores = self.compute_scores(prompt.ids(seg))
        self.counters.score_s += time.perf_counter() - t0
        self.counters.scored_chunks += 1
        self.store.put_extra(key, self.extra_name, scores)
        return scores

    def precompute(self, prompt: SegmentedPrompt) -> None:
        """Score every chunk of `prompt` (ingest / warm-up)."""
        for seg in prompt.segments:
            if seg.kind == CHUNK:
                self.scores(prompt, seg)

    def row(self, prompt: SegmentedPrompt, config: SteerConfig | None = None) -> SteerRow | None:
        """The steering of a call over `prompt`; None when it has no chunk or no question.
        `config` overrides the steerer's top_fraction and alpha (benchmark sweeps)."""
        cfg = config or self.config
        layers = cfg.layer_indices(self.num_layers) if config is not None else self.layers
        suffix = [s for s in prompt.segments if s.kind == SUFFIX]
        chunks = [s for s in prompt.segments if s.kind == CHUNK]
        if not suffix or not chunks:
            return None
        keys = torch.zeros((self.num_layers, len(prompt)), dtype=torch.bool)
        for seg in chunks:
            keys[:, seg.start:seg.end] = select(self.scores(prompt, seg), cfg.top_fraction, cfg.score)
        off = torch.ones(self.num_layers, dtype=torch.bool)
        off[list(layers)] = False
        keys[off] = False
        row = SteerRow(keys.to(self.device), suffix[-1].start, math.log(cfg.alpha))
        self.counters.steered_calls += 1
        self.counters.steered_tokens += row.num_steered
        return row


def head_prompt(prompt: SegmentedPrompt) -> SegmentedPrompt:
    """`prompt` without its suffix (the question): what a steered call can take from stored
    KV, since steering changes only the question's and answer's attention."""
    assert prompt.segments[-1].kind == SUFFIX, "a segmented answer prompt ends with its suffix"
    cut = prompt.segments[-1].start
    return SegmentedPrompt(prompt.token_ids[:cut], prompt.segments[:-1], prompt.chunk_context)


register()
