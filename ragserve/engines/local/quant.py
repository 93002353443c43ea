"""Weight quantization of the embedded engine's linear layers: int8 and int4.

Who owns what: `models.quantized_dir` owns where the quantized weights are cached; this
module owns the formats and the kernels; `ModelRunner` calls `quantize_model` once at
load. Flow: the model loads as today (safetensors -> fp32/bf16), then every nn.Linear
(lm_head included, see LM_HEAD) is swapped for a quantized module whose integer weights
come from the cache, or are computed once and written there.

Formats (the ones gpt-fast and torchao use):
    int8  symmetric per output channel: w ~= q * scale[n], q in [-127, 127]
    int4  asymmetric per group of GROUP input columns: w ~= (q - 8) * scale + zero, q in [0, 15]

Kernels. Decode matmuls have few rows and are bound by reading the weights, so they run
PyTorch's packed weight-only kernels (torch._weight_int8pack_mm,
torch._weight_int4pack_mm_for_cpu) with bf16 activations; prefill matmuls are
compute-bound, so they dequantize the weight and run the dense GEMM in the model's dtype
(the packed kernels are several times slower there). fbgemm's u8s8 GEMM is ~3x faster
than fp32 at decode on AVX2 but quantizes activations too, and lost 12% of top-1 tokens
on Qwen (eval/results/bench_quant.md), so it is not used.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ragserve.config import QUANTIZATIONS as MODES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1          # bump when a stored format changes: old caches are then rebuilt
MAX_DECODE_ROWS = 16        # matmuls with more rows (prefill) dequantize and run the dense GEMM
LM_HEAD = True              # quantize lm_head too (bench_quant.md: token agreement with and without)
_FILE = "quantized.safetensors"
_MARKER = "ragserve-quant.json"


def int4_group_size(in_features: int) -> int:
    for g in (128, 64, 32):
        if in_features % g == 0:
            return g
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


# -- quantizers (pure tensor functions) ----------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q int8 [N, K], scale fp32 [N])."""
    w = w.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: (nibbles uint8 [N, K/2] with column 2j in the low
    nibble, scale fp32 [N, K/group], zero fp32 [N, K/group])."""
    w = w.detach().float()
    n, k = w.shape
    wg = w.view(n, k // group, group)                                   # [N, G, group]
    lo, hi = wg.amin(-1), wg.amax(-1)                                   # [N, G]
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def _unpack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    n = nibbles.shape[0]
    return torch.stack([nibbles & 0xF, nibbles >> 4], -1).view(n, -1)   # [N, K] uint8 in [0, 15]


# -- modules ----------------------------------------------------------------------------------
_SCRATCH = threading.local()   # per thread: two engines in one process prefill concurrently


def _scratch(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A dequantization buffer for weights of `shape`, reused by every layer of that shape."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get((shape, dtype))
    if buf is None:
        with torch.inference_mode(False):   # a normal tensor: writable in and out of inference mode
            buf = bufs[(shape, dtype)] = torch.empty(shape, dtype=dtype)
    return buf


class _QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)                          # [M, K]
        y = self._small(rows) if rows.shape[0] <= MAX_DECODE_ROWS else self._dense(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(q.shape[1], q.shape[0], bias)
        self.register_buffer("qweight", q.contiguous())                # [N, K] int8
        self.register_buffer("scale", scale.float().contiguous())       # [N]
        self._scale_bf16 = self.scale.to(torch.bfloat16)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantize (scale fused) into a reused buffer: a fresh fp32 copy of every weight per
        # prefill page-faults through ~1.5 GB (with this buffer int8 prefill went 0.75x -> 0.84x).
        w = torch.mul(self.qweight, self.scale[:, None].to(x.dtype), out=_scratch(self.qweight.shape, x.dtype))
        return F.linear(x, w)

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 activations: on AVX2 this kernel's fp32 path is ~4x slower than its bf16 one.
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._scale_bf16).to(x.dtype)


class Int4Linear(_QuantLinear):
    def __init__(self, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        n, k = nibbles.shape[0], nibbles.shape[1] * 2
        super().__init__(k, n, bias)
        self.group = k // scale.shape[1]
        self.register_buffer("nibbles", nibbles.contiguous())           # [N, K/2] uint8
        self.register_buffer("scale", scale.float().contiguous())       # [N, G]
        self.register_buffer("zero", zero.float().contiguous())         # [N, G]
        q = _unpack_int4(self.nibbles).to(torch.int32)
        self._packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        scale_zero = torch.stack([self.scale.t(), self.zero.t()], -1)                        # [G, N, 2]
        self._scale_zero = scale_zero.to(torch.bfloat16).contiguous()

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        n, g = self.scale.shape
        q = _unpack_int4(self.nibbles).to(x.dtype).view(n, g, self.group)   # [N, G, group]
        w = (q - 8) * self.scale.to(x.dtype)[..., None] + self.zero.to(x.dtype)[..., None]
        return F.linear(x, w.view(n, -1))

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self._packed, self.group, self._scale_zero)
        return y.to(x.dtype)


class _Siblings(nn.Module):
    """Projections of one input (q/k/v, gate/up) as one matmul: at decode the weight-only
    kernels are bound by call overhead as much as by bytes (169 calls a step on Qwen-0.5B),
    so one call per input pays. The model calls each sibling with the same tensor; the first
    call computes all outputs, the others take their slice. The input is held (so its
    identity cannot be reused) only until every sibling has taken its part."""

    def __init__(self, fused: _QuantLinear, sizes: list[int]) -> None:
        super().__init__()
        self.fused, self.sizes = fused, sizes
        self._x: torch.Tensor | None = None
        self._parts: list[torch.Tensor | None] = []

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x or self._parts[i] is None:
            self._x = x
            # views, not copies: copying a prefill's parts (tens of MB a layer) held int8
            # prefill at 0.84x of fp32, views reach 1.03x; callers only split the last dim
            self._parts = list(self.fused(x).split(self.sizes, -1))
        y, self._parts[i] = self._parts[i], None
        if all(p is None for p in self._parts):
            self._x = None
        assert y is not None
        return y


class SiblingLinear(nn.Module):
    """One of `_Siblings`' projections, where the model expects an nn.Linear."""

    def __init__(self, group: _Siblings, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = group.fused.in_features, group.sizes[index]
        self.index = index
        self._group = [group]   # a list: the group is registered once, by its parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].part(self.index, x)


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _concat(mods: list[_QuantLinear]) -> _QuantLinear:
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]
    bias = torch.cat(biases) if any(m.bias is not None for m in mods) else None
    if isinstance(mods[0], Int8Linear):
        return Int8Linear(torch.cat([m.qweight for m in mods]), torch.cat([m.scale for m in mods]), bias)
    return Int4Linear(torch.cat([m.nibbles for m in mods]), torch.cat([m.scale for m in mods]),
                      torch.cat([m.zero for m in mods]), bias)


def fuse_siblings(model: nn.Module) -> int:
    """Fuse every quantized sibling set (SIBLINGS) of `model` in place; returns how many."""
    fused = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            mods = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, type(mods[0])) and isinstance(m, _QuantLinear) for m in mods):
                continue
            if len({m.in_features for m in mods}) != 1 or len({getattr(m, "group", 0) for m in mods}) != 1:
                continue
            group = _Siblings(_concat(mods), [m.out_features for m in mods])
            parent.add_module("_".join(n.split("_")[0] for n in names) + "_fused", group)
            for i, n in enumerate(names):
                setattr(parent, n, SiblingLinear(group, i))
            fused += 1
    return fused


# -- model-level: quantize once, cache, load --------------------------------------------------
def _targets(model: nn.Module, lm_head: bool) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in names if lm_head or n != "lm_head"]


def _quantize_tensors(model: nn.Module, mode: str, names: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        if mode == "int8":
            out[f"{name}.qweight"], out[f"{name}.scale"] = quantize_int8(w)
        else:
            nib, scale, zero = quantize_int4(w, int4_group_size(w.shape[1]))
            out[f"{name}.nibbles"], out[f"{name}.scale"], out[f"{name}.zero"] = nib, scale, zero
    return out


def _marker(mode: str, source: str, lm_head: bool) -> dict:
    return {"mode": mode, "version": FORMAT_VERSION, "source": source, "lm_head": lm_head}


def cached_tensors(cache: Path, mode: str, source: str, lm_head: bool) -> dict[str, torch.Tensor] | None:
    """The cached quantized tensors when `cache` holds them for exactly this source and mode."""
    from safetensors.torch import load_file

    marker = cache / _MARKER
    if not marker.is_file() or json.loads(marker.read_text()) != _marker(mode, source, lm_head):
        return None
    return load_file(cache / _FILE)


def _save(cache: Path, tensors: dict[str, torch.Tensor], marker: dict) -> None:
    from safetensors.torch import save_file

    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp dir and rename: a crash mid-write leaves no half cache.
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{cache.name}-") as tmp:
        out = Path(tmp) / "q"
        out.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / _FILE)
        (out / _MARKER).write_text(json.dumps(marker))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(out, cache)


def quantize_model(model: nn.Module, mode: str, cache: Path, source: str, lm_head: bool = LM_HEAD) -> None:
    """Swap `model`'s linear layers for `mode` ones, in place. `source` identifies the
    unquantized weights (their sha256): a cache made from other weights is rebuilt."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r} must be one of {', '.join(MODES)}")
    if mode == "none":
        return
    t0 = time.perf_counter()
    names = _targets(model, lm_head)
    tensors = cached_tensors(cache, mode, source, lm_head)
    if tensors is None:
        logger.info("quantizing %d linear layers to %s into %s (once)", len(names), mode, cache)
        tensors = _quantize_tensors(model, mode, names)
        _save(cache, tensors, _marker(mode, source, lm_head))
    for name in names:
        old = model.get_submodule(name)
        if mode == "int8":
            new: nn.Module = Int8Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scale"], old.bias)
        else:
            new = Int4Linear(tensors[f"{name}.nibbles"], tensors[f"{name}.scale"], tensors[f"{name}.zero"], old.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    groups = fuse_siblings(model)
    logger.info("quantized to %s in %.1f s (%d sibling groups fused)", mode, time.perf_counter() - t0, groups)
