"""The one place the model picks an implementation: Triton kernels on CUDA, PyTorch elsewhere.

fp32 attention on CUDA goes to PyTorch (SDPA) too: the kernels compute fp32 as exact-fp32 FMA
loops (no tensor cores) that spill registers, and at head dim 128 they need more shared memory
than GPUs with 99 KB per block have (RTX 4090, L40), so they would not even launch there. The
kernels are for the bf16/fp16 the model trains and runs in; forcing "triton" still reaches them.

Force one with the environment variable NANOLLAVA_KERNELS=triton|torch|auto, or in code
with `dispatch.use("triton")` (also a context manager, for tests and benchmarks).
Forced Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported (the tests'
conftest does this on machines without CUDA).
"""
import os
from contextlib import contextmanager

import torch

from nanollava.kernels.flash_attention import flash_attention
from nanollava.kernels.reference import attention_reference, rms_norm_reference
from nanollava.kernels.rms_norm import rms_norm as rms_norm_triton

_impl = os.environ.get("NANOLLAVA_KERNELS", "auto")


def use(impl):
    """Set the implementation ("auto" | "triton" | "torch"); usable as `with use(...):`."""
    global _impl
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel implementation must be auto, triton or torch, not {impl!r}")
    previous, _impl = _impl, impl

    @contextmanager
    def restore():
        global _impl
        try:
            yield
        finally:
            _impl = previous
    return restore()


def use_triton(x, attention=False):
    """Triton for this tensor? "auto": CUDA tensors, except fp32 attention (see above)."""
    if _impl != "auto":
        return _impl == "triton"
    return x.is_cuda and not (attention and x.dtype == torch.float32)


def _check_triton_device(x):
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("nanollava kernels: Triton was forced (NANOLLAVA_KERNELS=triton or "
                           "dispatch.use('triton')) on a CPU tensor; use a CUDA device, or set "
                           "TRITON_INTERPRET=1 before importing triton to run the interpreter")


def attention(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Scaled dot-product attention, q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D)."""
    if use_triton(q, attention=True):
        _check_triton_device(q)
        return flash_attention(q, k, v, causal=causal, scale=scale,
                               key_padding_mask=key_padding_mask)
    return attention_reference(q, k, v, causal, key_padding_mask, scale)


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim (HF cast order)."""
    if use_triton(x):
        _check_triton_device(x)
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
