"""Benchmark the Triton kernels against PyTorch at the real LLaVA-1.5 shapes (needs a CUDA GPU).

    python -m nanollava.kernels.bench                  # every case
    python -m nanollava.kernels.bench --only attention # or rms_norm

Attention: flash_attention vs F.scaled_dot_product_attention (PyTorch picks its best backend:
FlashAttention-2 / cuDNN / memory-efficient; for GQA the baseline gets K, V already repeated to
Hq heads, outside the timed region, so it can use its fastest kernel). Times forward, backward
and forward + backward, prints TFLOP/s (causal counts half the score matrix) and the speedup
(PyTorch time / Triton time; > 1 means Triton is faster).
RMSNorm: rms_norm vs torch.nn.RMSNorm and the eager HF-order reference, forward / backward in
GB/s of compulsory traffic.
--json PATH also writes every row as JSON (bench/gpu.py reads it against the targets).
On a machine without CUDA it says so and exits 0.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

from nanollava.kernels.flash_attention import flash_attention
from nanollava.kernels.reference import rms_norm_reference
from nanollava.kernels.rms_norm import rms_norm

# (name, B, Hq, Hkv, T, D, causal): T == S, bf16
ATTENTION_CASES = [
    ("CLIP ViT-L/336 tower", 32, 16, 16, 577, 64, False),
    ("Vicuna-7B, 2048 ctx", 8, 32, 32, 2048, 128, True),
    ("GQA 8:1 (32 q / 4 kv heads)", 8, 32, 4, 2048, 128, True),
]
# (name, rows, hidden): 16k tokens x LLaMA-7B hidden, bf16 x and weight
RMS_NORM_CASES = [("LLaMA-7B hidden, 16k tokens", 16384, 4096)]
ROWS = []          # every printed row, for --json


def _time_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def _fwd_bwd_times(fwd, inputs, grad_out):
    """(forward ms, backward ms, forward + backward ms) for fwd(*inputs) -> tensor."""
    def step():
        for x in inputs:
            x.grad = None
        fwd(*inputs).backward(grad_out)

    out = fwd(*inputs)

    def bwd():
        for x in inputs:
            x.grad = None
        out.backward(grad_out, retain_graph=True)

    return _time_ms(lambda: fwd(*inputs)), _time_ms(bwd), _time_ms(step)


def bench_attention(dtype):
    print(f"\n== attention ({dtype}) ==")
    print(f"{'case':32s} {'pass':8s} {'triton ms':>10s} {'TFLOP/s':>8s} {'sdpa ms':>9s} "
          f"{'TFLOP/s':>8s} {'speedup':>8s}")
    for name, B, Hq, Hkv, T, D, causal in ATTENTION_CASES:
        q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        # the baseline gets K, V repeated to Hq heads beforehand (not timed) so any backend applies
        k_rep = k.detach().repeat_interleave(Hq // Hkv, 1).requires_grad_()
        v_rep = v.detach().repeat_interleave(Hq // Hkv, 1).requires_grad_()

        def triton_fn(q, k, v):
            return flash_attention(q, k, v, causal=causal)

        def sdpa_fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        err = (triton_fn(q, k, v) - sdpa_fn(q, k_rep, v_rep)).abs().max().item()
        flops_fwd = 4 * B * Hq * T * T * D * (0.5 if causal else 1.0)
        flops = (flops_fwd, 2.5 * flops_fwd, 3.5 * flops_fwd)   # bwd = 5 matmuls vs fwd's 2
        t_triton = _fwd_bwd_times(triton_fn, (q, k, v), do)
        t_sdpa = _fwd_bwd_times(sdpa_fn, (q, k_rep, v_rep), do)
        for pass_name, f, a, b in zip(("fwd", "bwd", "fwd+bwd"), flops, t_triton, t_sdpa):
            print(f"{name:32s} {pass_name:8s} {a:10.3f} {f / a / 1e9:8.1f} {b:9.3f} "
                  f"{f / b / 1e9:8.1f} {b / a:7.2f}x")
            ROWS.append({"kernel": "attention", "case": name, "pass": pass_name, "triton_ms": a, "sdpa_ms": b,
                         "triton_tflops": f / a / 1e9, "speedup": b / a})
        print(f"{'':32s} max |triton - sdpa| forward = {err:.3g}")


def bench_rms_norm(dtype):
    print(f"\n== rms_norm ({dtype}) ==")
    print(f"{'case':32s} {'pass':5s} {'impl':14s} {'ms':>8s} {'GB/s':>8s} {'speedup':>8s}")
    for name, M, N in RMS_NORM_CASES:
        x = torch.randn(M, N, device="cuda", dtype=dtype, requires_grad=True)
        module = torch.nn.RMSNorm(N, eps=1e-5, device="cuda", dtype=dtype)
        w = module.weight
        dy = torch.randn_like(x)
        size = x.element_size()
        bytes_fwd = 2 * M * N * size + N * size                  # read x, write y, read weight
        bytes_bwd = 3 * M * N * size + 2 * N * size              # read x, dy, write dx, weight
        impls = [("triton", lambda x: rms_norm(x, w, 1e-5)),
                 ("nn.RMSNorm", module),
                 ("eager HF order", lambda x: rms_norm_reference(x, w, 1e-5))]
        times = {label: _fwd_bwd_times(fn, (x,), dy) for label, fn in impls}
        for i, (pass_name, nbytes) in enumerate((("fwd", bytes_fwd), ("bwd", bytes_bwd))):
            for label, _ in impls:
                t = times[label][i]
                print(f"{name:32s} {pass_name:5s} {label:14s} {t:8.3f} {nbytes / t / 1e6:8.1f} "
                      f"{t / times['triton'][i]:7.2f}x")
                ROWS.append({"kernel": "rms_norm", "case": name, "pass": pass_name, "impl": label, "ms": t,
                             "gbps": nbytes / t / 1e6, "speedup": t / times["triton"][i]})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["attention", "rms_norm"], help="run one kernel only")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels/bench.py needs a CUDA GPU and none is available: nothing measured.")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.only in (None, "attention"):
        bench_attention(dtype)
    if args.only in (None, "rms_norm"):
        bench_rms_norm(dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
