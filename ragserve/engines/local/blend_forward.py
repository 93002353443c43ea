"""A layer-wise forward of Llama/Qwen2 decoder stacks over a shrinking token subset.

This is the compute half of CacheBlend (arXiv 2405.16444 §4): the model's own modules
(embedding, per-layer norms, q/k/v/o projections, MLP, rotary embedding, final norm, LM
head) run in our own loop, so transformers is not forked or patched. Per layer:

    x = norm(h[active])  ->  q, k, v for the active tokens only
    rotate q, k to the active tokens' positions
    at a check layer: deviation |k - k_reused|^2 per reusable active token (post-RoPE keys,
        as LMCache); keep the top ones and every fresh token; the rest leave `active` for good
    K, V = reused KV of the whole prompt (keys already rotated to their positions), with
           the fresh k, v written at the active positions
    h[active] += o_proj(attention(q over K, V with a causal mask by position)); h += mlp

Before the first check layer every token is active and the layer is a plain causal
prefill. With nothing reusable it *is* a plain prefill: `run` also precomputes a segment's
KV (returning pre-RoPE keys). The last layer runs attention and MLP for the last token
only (the others' outputs are never read). Shapes: batch is always 1; T tokens, s active, H_q/H_kv
heads, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class BlendUnsupported(ValueError):
    """The model's architecture is not one the layer-wise forward reproduces."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention, as HF Llama/Qwen2): x [1, H, s, D], cos/sin [1, s, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)          # [1, 1, s, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class ReusedKV:
    """Stored KV laid out over a whole prompt, keys rotated to their positions there.

    `run` writes the fresh KV of the tokens it computes into these tensors (they become
    the prompt's cache without a copy): pass a copy to blend the same prompt twice.
    """

    keys: torch.Tensor     # [L, H_kv, T, D], post-RoPE; rows of fresh tokens are zeros
    values: torch.Tensor   # [L, H_kv, T, D]
    reused: torch.Tensor   # [T] bool: the row holds stored KV
    # [T] bool: reused rows recomputed whatever their deviation (a chunk's first tokens,
    # its boundaries); they count against the ratio's budget. None = none forced.
    forced: torch.Tensor | None = None

    @property
    def num_reused(self) -> int:
        return int(self.reused.sum())

    def clone(self) -> "ReusedKV":
        return ReusedKV(self.keys.clone(), self.values.clone(), self.reused, self.forced)


@dataclass
class ForwardOut:
    keys: list[torch.Tensor]           # per layer [1, H_kv, T, D], post-RoPE (as HF caches them)
    values: list[torch.Tensor]         # per layer [1, H_kv, T, D]
    logits: torch.Tensor | None        # [V] float32, of the last token
    pre_rope_keys: list[torch.Tensor] | None = None   # per layer [1, H_kv, T, D], when asked
    # (layer, active tokens after it) at every check layer
    num_active: list[tuple[int, int]] = field(default_factory=list)
    # active tokens summed over layers (a full prefill: T * L): the work done
    token_layers: int = 0


class LayerwiseModel:
    """Runs a loaded HF causal LM layer by layer. Holds no per-request state."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise BlendUnsupported(f"blending supports {', '.join(SUPPORTED_MODEL_TYPES)} models, "
                                   f"not model_type={cfg.model_type!r}")
        if getattr(cfg, "use_sliding_window", False):
            raise BlendUnsupported("blending does not support sliding-window attention")
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        self.num_layers = len(self.layers)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, T, D] from the model's own rotary module (handles rope scaling)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.body.rotary_emb(probe, positions.view(1, -1))

    def place(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate pre-RoPE keys [L, H_kv, T, D] to `positions` [T] (CacheBlend re-alignment)."""
        cos, sin = self.rope(positions)                    # [1, T, D]
        return rotate(keys, cos, sin)                      # broadcasts over layers and heads

    @torch.inference_mode()
    def run(self, input_ids: Sequence[int], reused: ReusedKV | None = None,
            schedule: Sequence[tuple[int, float]] = (), keep_pre_rope: bool = False,
            logits: bool = True, deviation: str = "key", deviation_mass: float = 0.0) -> ForwardOut:
        """Prefill `input_ids` at positions 0..T-1.

        `schedule` lists (check layer, ratio): at that layer keep the top `ceil(ratio *
        reused.num_reused)` reusable tokens by key deviation plus every fresh token. An empty
        schedule computes every token at every layer. `reused` is consumed (see ReusedKV).
        `deviation_mass` > 0 makes the ratio a cap: keep only as many top tokens as cover
        that share of the reusable tokens' total deviation (a per-prompt ratio).
        """
        T = len(input_ids)
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)   # [1, T]
        positions = torch.arange(T, device=self.device)
        cos_all, sin_all = self.rope(positions)                                       # [1, T, D]
        checks = dict(schedule)
        if checks and reused is None:
            raise ValueError("a selection schedule needs reused KV to compare against")
        num_reused = reused.num_reused if reused is not None else 0
        h = self.body.embed_tokens(ids)                  # [1, T, d_model]
        active: torch.Tensor | None = None               # None = all tokens; else sorted [s] indices
        cos, sin, mask = cos_all, sin_all, None
        out = ForwardOut([], [], None, [] if keep_pre_rope else None)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            s = h.shape[1]
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, s, -1, self.head_dim).transpose(1, 2)   # [1, H_q, s, D]
            k = attn.k_proj(x).view(1, s, -1, self.head_dim).transpose(1, 2)   # [1, H_kv, s, D]
            v = attn.v_proj(x).view(1, s, -1, self.head_dim).transpose(1, 2)   # [1, H_kv, s, D]
            if keep_pre_rope:
                assert active is None, "pre-RoPE keys are only kept for a full prefill"
                out.pre_rope_keys.append(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if li in checks:
                assert reused is not None
                fresh, old = (k, reused.keys[li]) if deviation == "key" else (v, reused.values[li])
                keep = self._select(fresh, old, reused.reused, active, checks[li], num_reused,
                                    reused.forced, deviation_mass)
                if keep is not None:
                    active = keep if active is None else active[keep]
                    h, q, k, v = h[:, keep], q[:, :, keep], k[:, :, keep], v[:, :, keep]
                    cos, sin = cos_all[:, active], sin_all[:, active]                # [1, s, D]
                    mask = positions.view(1, T) <= active.view(-1, 1)               # [s, T]
                out.num_active.append((li, T if active is None else len(active)))
            if active is None:
                keys, values = k, v
            else:
                assert reused is not None
                keys, values = reused.keys[li].unsqueeze(0), reused.values[li].unsqueeze(0)   # [1, H_kv, T, D]
                keys[:, :, active], values[:, :, active] = k, v
            out.keys.append(keys)
            out.values.append(values)
            out.token_layers += h.shape[1]
            if li == self.num_layers - 1:
                # Only the last token's output is used: its KV is stored, the rest is skipped.
                if not logits:
                    break
                h, q, mask = h[:, -1:], q[:, :, -1:], None                           # it sees every key
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                               is_causal=mask is None and q.shape[2] > 1,
                                               scale=attn.scaling, enable_gqa=True)   # [1, H_q, s, D]
            o = o.transpose(1, 2).reshape(1, h.shape[1], -1)                          # [1, s, H_q*D]
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if logits:
            last = self.body.norm(h[:, -1:])                                          # [1, 1, d_model]
            out.logits = self.model.lm_head(last)[0, -1].float()                      # [V]
        return out

    @staticmethod
    def _select(k: torch.Tensor, old_keys: torch.Tensor, is_reused_all: torch.Tensor,
                active: torch.Tensor | None, ratio: float, num_reused: int,
                forced_all: torch.Tensor | None = None, mass: float = 0.0) -> torch.Tensor | None:
        """Indices into the active tokens to keep (sorted), or None to keep them all.

        k [1, H_kv, s, D] fresh and old_keys [H_kv, T, D] reused keys, both post-RoPE (or the
        values: the deviation is the same sum of squares). Kept: every fresh token, the forced
        reused ones, then the rest of the budget by deviation.
        """
        s = k.shape[2]
        idx = active if active is not None else torch.arange(s, device=k.device)
        is_reused = is_reused_all[idx]                                               # [s]
        num_reused_active = int(is_reused.sum())
        budget = min(num_reused_active, math.ceil(ratio * num_reused - 1e-9))
        forced = (forced_all[idx] & is_reused) if forced_all is not None else None   # [s]
        num_forced = int(forced.sum()) if forced is not None else 0
        if budget >= num_reused_active and mass <= 0.0:
            return None
        old = old_keys[:, idx].unsqueeze(0)                                          # [1, H_kv, s, D]
        dev = (k.float() - old.float()).pow(2).sum(dim=(0, 1, 3))                     # [s]
        if mass > 0.0:   # the fewest unforced tokens covering `mass` of their deviation, up to the cap
            free = dev.masked_fill(~is_reused, 0.0)
            if forced is not None:
                free = free.masked_fill(forced, 0.0)
            ranked = free.sort(descending=True).values
            total = float(ranked.sum())
            if total > 0.0:
                covered = int((ranked.cumsum(0) < mass * total).sum()) + 1
                budget = min(budget, num_forced + covered)
        budget = max(budget, num_forced)
        if budget >= num_reused_active:
            return None
        if forced is not None:
            dev = dev.masked_fill(forced, torch.finfo(dev.dtype).max)                # before any unforced
        dev = dev.masked_fill(~is_reused, float("inf"))                              # fresh: always kept
        keep = torch.topk(dev, (s - num_reused_active) + budget).indices
        return keep.sort().values
