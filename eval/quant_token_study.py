"""Token-level effect of each quantization on Qwen, without generation: teacher-forced
next-token top-1 agreement and mean KL(unquantized || quantized) over every position of 3
prompts of 400 squad-passage tokens (1200 positions), one thread.

    python eval/quant_token_study.py [--variants int8,int8:no-lm-head,int8:decode-kernel,int4:no-lm-head]

`decode-kernel` runs every row through the decode kernel (bf16 activations) instead of the
dense prefill path, i.e. what each decode step computes. Prints one JSON line per variant.

`w8a8:<proj>+<proj>...` (e.g. `w8a8:gate_proj+up_proj`) swaps only those projections for
fbgemm's dynamic int8 GEMM (int8 weights per channel, activations quantized per row, as a
decode step would; the rest stays fp32): the kernel is ~1.7x faster than the weight-only one
at decode, and this measures what quantizing the activations of each projection costs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ragserve.config import datasets_dir  # noqa: E402
from ragserve.engines.local import quant  # noqa: E402
from ragserve.engines.local.models import model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--variants", default="int8:no-lm-head,int8,int8:decode-kernel,int4:no-lm-head")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    with open(datasets_dir() / "squad" / "corpus.jsonl") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(40))]
    ids = tok.encode("\n\n".join(texts), add_special_tokens=False)
    prompts = [ids[i * 400:(i + 1) * 400] for i in range(3)]

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logits(model) -> torch.Tensor:
        return torch.cat([model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts])

    ref = logits(load())
    ref_logp, ref_top = torch.log_softmax(ref, -1), ref.argmax(-1)
    for variant in args.variants.split(","):
        mode, _, flag = variant.partition(":")
        model = load()
        if mode == "w8a8":
            swap_w8a8(model, set(flag.split("+")))
        else:
            quant.quantize_model(model, mode, Path(tempfile.mkdtemp()) / "q", "study", lm_head=flag != "no-lm-head")
            quant.MAX_DECODE_ROWS = 10**9 if flag == "decode-kernel" else 16
        t0 = time.perf_counter()
        out = logits(model)
        logp = torch.log_softmax(out, -1)
        print(json.dumps({"variant": variant, "positions": len(ref_top),
                          "top1_agreement": round((out.argmax(-1) == ref_top).float().mean().item(), 4),
                          "mean_kl": round((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item(), 5),
                          "forward_s": round(time.perf_counter() - t0, 1)}), flush=True)


class DynamicInt8Linear(torch.nn.Module):
    """fbgemm's dynamic int8 linear, one row at a time (each row's activations get their own
    scale, as at decode)."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        _, scale = quant.quantize_int8(w)   # the engine's per-channel scales
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        bias = None if lin.bias is None else lin.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.cat([torch.ops.quantized.linear_dynamic(rows[i:i + 1], self.packed, True)
                       for i in range(rows.shape[0])])
        return y.view(*x.shape[:-1], self.out_features)


def swap_w8a8(model: torch.nn.Module, projections: set[str]) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in projections:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, DynamicInt8Linear(m))


if __name__ == "__main__":
    main()
