"""Model execution for the embedded engine: tokenize, prefill, decode, sample.

The running batch is a `BatchKV`: per-layer K/V of shape [B, kv_heads, T, head_dim],
left-padded, with a [B, T] attention mask. New calls are prefilled as their own
left-padded batch and merged into the running one between decode steps (continuous
batching at step granularity); finished rows are dropped. Positions come from the
mask, so padding never shifts a sequence's RoPE positions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from ragserve.domain import LLMCall, ModelSpec

if TYPE_CHECKING:   # steer.py imports transformers' attention registries; only steered calls need it
    from ragserve.engines.local.steer import SteerRow

logger = logging.getLogger(__name__)


def _cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX). Without them bf16 is emulated and ~3x
    slower than fp32, so fp32 is the faster choice."""
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f is not None and f() for f in check)


def pick_device_dtype(override: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA: bf16 (fp16 on older GPUs). CPU: bf16 where the CPU has native bf16, else fp32.
    `override` ("bf16" | "fp16" | "fp32") wins, e.g. from RAGSERVE_DTYPE."""
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), named.get(override or "", dtype)
    return torch.device("cpu"), named.get(override or "", torch.bfloat16 if _cpu_has_bf16() else torch.float32)


@dataclass
class BatchKV:
    """KV of the running batch. Rows are calls; columns are token slots (left-padded).

    Wraps the model's own DynamicCache so decode steps append in place; only merge and
    select (a few times per call) rebuild the per-layer tensors.
    """

    cache: DynamicCache        # per layer: keys/values [B, H_kv, T, D]
    mask: torch.Tensor         # [B, T] long, 1 = real token
    positions: torch.Tensor    # [B] next position per row

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    def _map(self, fn) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = fn(layer.keys), fn(layer.values)

    def select(self, rows: list[int]) -> "BatchKV | None":
        """Keep `rows`; drop columns that are padding in every kept row."""
        if not rows:
            return None
        if rows == list(range(self.size)):
            return self
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        first = int((mask.sum(0) > 0).nonzero()[0])   # leading all-pad columns
        self._map(lambda x: x.index_select(0, idx)[:, :, first:].contiguous())
        return BatchKV(self.cache, mask[:, first:], self.positions.index_select(0, idx))

    @staticmethod
    def merge(a: "BatchKV | None", b: "BatchKV") -> "BatchKV":
        """Stack batch b under batch a, left-padding the shorter one."""
        if a is None:
            return b
        ta, tb = a.mask.shape[1], b.mask.shape[1]
        t = max(ta, tb)

        def lpad(x: torch.Tensor, have: int, dim: int) -> torch.Tensor:
            if have == t:
                return x
            shape = list(x.shape)
            shape[dim] = t - have
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys = torch.cat([lpad(la.keys, ta, 2), lpad(lb.keys, tb, 2)])
            la.values = torch.cat([lpad(la.values, ta, 2), lpad(lb.values, tb, 2)])
        mask = torch.cat([lpad(a.mask, ta, 1), lpad(b.mask, tb, 1)])
        return BatchKV(a.cache, mask, torch.cat([a.positions, b.positions]))


class ModelRunner:
    """Owns the model and tokenizer; every torch op of the embedded engine lives here."""

    def __init__(self, path: Path, name: str, threads: int | None = None, dtype: str | None = None,
                 quantization: str = "none", quant_cache: Path | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.device, self.dtype = pick_device_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.quantization = quantization
        if quantization != "none":
            if self.device.type != "cpu":
                raise ValueError(f"quantization={quantization!r} has CPU kernels only; use none on {self.device}")
            from ragserve.engines.local.models import source_id
            from ragserve.engines.local.quant import quantize_model

            assert quant_cache is not None, "a quantized model needs its cache dir"
            quantize_model(self.model, quantization, quant_cache, source_id(path))
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.spec = ModelSpec(name=name, num_layers=cfg.num_hidden_layers,
                              num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                              dtype_bytes=torch.finfo(self.dtype).bits // 8,
                              max_context=cfg.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    # -- tokenization -------------------------------------------------------------
    def encode_call(self, call: LLMCall) -> list[int]:
        messages = [{"role": r, "content": c} for r, c in call.messages]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- forward passes -------------------------------------------------------------
    @staticmethod
    def _steer_kwargs(rows: "Sequence[SteerRow | None] | None", seq_lens: Sequence[int] | torch.Tensor,
                      num_keys: int, num_queries: int) -> dict:
        """The model kwargs that steer `rows` (LLMSteer), or none when no row is steered.
        `seq_lens` may be a tensor: it is read only when a row is steered (decode's hot path)."""
        if not rows or all(r is None for r in rows):
            return {}
        from ragserve.engines.local.steer import SteerBatch

        if isinstance(seq_lens, torch.Tensor):
            seq_lens = seq_lens.tolist()

        batch = SteerBatch.build(rows, seq_lens, num_keys, num_queries)
        return {} if batch is None else {"steer": batch}

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], steer: "Sequence[SteerRow | None] | None" = None
                ) -> tuple[BatchKV, torch.Tensor]:
        """Prefill left-padded prompts; returns their KV and last-token logits [b, V].
        `steer` (one per prompt, None = unsteered) steers their questions (see steer.py)."""
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t - len(p):] = torch.tensor(p)
            mask[i, t - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         cache=cache, use_cache=True, logits_to_keep=1,
                         **self._steer_kwargs(steer, [len(p) for p in prompts], t, t))
        return BatchKV(cache, mask, mask.sum(-1)), out.logits[:, -1, :].float()

    @torch.inference_mode()
    def extend(self, cache: DynamicCache, prompt: Sequence[int], start: int,
               steer: "SteerRow | None" = None) -> tuple[BatchKV, torch.Tensor]:
        """Prefill `prompt[start:]` of one call whose first `start` tokens' KV is in `cache`
        (e.g. blended); returns the call's KV and last-token logits [1, V]."""
        n = len(prompt)
        ids = torch.tensor([list(prompt[start:])], dtype=torch.long, device=self.device)
        pos = torch.arange(start, n, device=self.device).view(1, -1)
        out = self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1, **self._steer_kwargs([steer], [n], n, n - start))
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        return BatchKV(cache, mask, torch.tensor([n], device=self.device)), out.logits[:, -1, :].float()

    @torch.inference_mode()
    def decode_step(self, kv: BatchKV, last_tokens: list[int], steer: "Sequence[SteerRow | None] | None" = None
                    ) -> tuple[BatchKV, torch.Tensor]:
        """Feed one token per row; returns the grown KV and next-token logits [B, V].
        `steer` (one per row, None = unsteered) steers the new tokens (see steer.py)."""
        tokens = torch.tensor(last_tokens, dtype=torch.long)
        mask = torch.cat([kv.mask, torch.ones((kv.size, 1), dtype=kv.mask.dtype, device=kv.mask.device)], -1)
        grown = kv.positions + 1   # each row's length once this token is in
        out = self.model(input_ids=tokens.view(-1, 1).to(self.device), attention_mask=mask,
                         position_ids=kv.positions.view(-1, 1), cache=kv.cache, use_cache=True,
                         **self._steer_kwargs(steer, grown, mask.shape[1], 1))
        return BatchKV(kv.cache, mask, grown), out.logits[:, -1, :].float()

    @staticmethod
    def sample(logits: torch.Tensor, temperatures: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy rows where temperature == 0, else softmax sampling. Returns (tokens, logprobs)."""
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(-1)
        for i, temp in enumerate(temperatures):
            if temp > 0:
                probs = torch.softmax(logits[i] / temp, dim=-1)
                tokens[i] = torch.multinomial(probs, 1)[0]
        return tokens, logp.gather(-1, tokens.view(-1, 1)).view(-1)
