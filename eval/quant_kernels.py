"""Decode-shaped matmul kernels on this CPU: how fast each reads a model's worth of weights.

    python eval/quant_kernels.py [--threads 2] [--layers 24]

One decode step of Qwen2.5-0.5B multiplies one activation row by every layer's q/k/v/o and
gate/up/down weight. This runs exactly those shapes over `--layers` distinct copies (so the
weights come from DRAM, not the cache, as in a real step) with each kernel PyTorch offers,
and prints ms per step and the weight bytes it read per second, next to a plain read probe
(a sum over 1 GiB). It explains the end-to-end decode figures of eval/bench_engine.py: a
kernel that reads at a fraction of the probe cannot decode at the bandwidth ceiling.

Kernels: fp32 dense (`F.linear`), packed weight-only int8 (`torch._weight_int8pack_mm`, bf16
activations, what `engine.quantization: int8` runs), fbgemm fp16 weights
(`quantized.linear_dynamic_fp16`, fp32 activations) and fbgemm dynamic int8
(`quantized.linear_dynamic`: activations quantized too, see eval/quant_token_study.py w8a8).
Prints one JSON line per kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

SHAPES = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]   # (N, K)


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated.*")
    torch.set_num_threads(args.threads)
    params = args.layers * sum(n * k for n, k in SHAPES)
    probe = torch.ones(2**28)
    read_s = timed(probe.sum)
    print(json.dumps({"kernel": "read probe (sum over 1 GiB)", "gb_s": round(probe.numel() * 4 / read_s / 1e9, 2)}))
    del probe
    x32 = {k: torch.randn(1, k) for k in (896, 4864)}
    x16 = {k: v.bfloat16() for k, v in x32.items()}

    def report(name: str, fn, bytes_per_param: float) -> None:
        s = timed(fn)
        print(json.dumps({"kernel": name, "ms_per_step": round(s * 1e3, 1),
                          "gb_s": round(params * bytes_per_param / s / 1e9, 2)}), flush=True)

    dense = [[torch.randn(n, k) for n, k in SHAPES] for _ in range(args.layers)]
    report("fp32 dense", lambda: [torch.nn.functional.linear(x32[w.shape[1]], w) for layer in dense for w in layer], 4)
    int8 = [[(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()) for n, k in SHAPES]
            for _ in range(args.layers)]
    report("int8 weight-only (_weight_int8pack_mm, bf16 act)",
           lambda: [torch._weight_int8pack_mm(x16[w.shape[1]], w, s) for layer in int8 for w, s in layer], 1)
    fp16 = [[torch.ops.quantized.linear_prepack_fp16(w, None) for w in layer] for layer in dense]
    report("fbgemm fp16 weights (fp32 act)",
           lambda: [torch.ops.quantized.linear_dynamic_fp16(x32[k], p) for layer in fp16
                    for (_, k), p in zip(SHAPES, layer)], 2)
    del fp16
    dyn = []
    for layer in dense:
        packed = []
        for w in layer:
            scale = (w.abs().amax(1) / 127).double()
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            packed.append(torch.ops.quantized.linear_prepack(q, None))
        dyn.append(packed)
    report("fbgemm dynamic int8 (activations int8 too)",
           lambda: [torch.ops.quantized.linear_dynamic(x32[k], p, True) for layer in dyn
                    for (_, k), p in zip(SHAPES, layer)], 1)


if __name__ == "__main__":
    main()
