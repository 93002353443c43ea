"""Does torch.compile pay off for the embedded engine's decode step on this CPU?

    python eval/decode_compile_probe.py [--model smollm2] [--quantization int8]

Times 16 greedy decode steps after a 256-token prefill, eagerly and with
`torch.compile(model.forward, dynamic=True)`, three runs each, and prints the compile time
(the first compiled run) and the step times. The KV grows every step, so this also shows
whether the compiled graph recompiles as it does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import passages, prompt_of  # noqa: E402
from ragserve.engines.local.models import model_dir, quantized_dir  # noqa: E402
from ragserve.engines.local.runner import ModelRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quantization", default="int8")
    args = ap.parse_args()
    r = ModelRunner(model_dir(args.model), args.model, quantization=args.quantization,
                    quant_cache=quantized_dir(args.model, args.quantization))
    prompt = prompt_of(r, 256, passages(40))

    def step_ms(steps: int = 16) -> float:
        kv, logits = r.prefill([prompt])
        tok = logits.argmax(-1).tolist()
        t0 = time.perf_counter()
        for _ in range(steps):
            kv, logits = r.decode_step(kv, tok)
            tok = logits.argmax(-1).tolist()
        return round((time.perf_counter() - t0) / steps * 1e3, 1)

    print("eager step ms", [step_ms() for _ in range(3)], flush=True)
    r.model.forward = torch.compile(r.model.forward, dynamic=True)
    t0 = time.perf_counter()
    first = step_ms(4)
    print(f"first compiled run: {time.perf_counter() - t0:.0f} s ({first} ms a step)", flush=True)
    print("compiled step ms", [step_ms() for _ in range(3)])


if __name__ == "__main__":
    main()
