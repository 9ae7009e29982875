"""Kernels for nanollava, each beside its pure-PyTorch reference.

flash_attention  FlashAttention-2 forward + backward (kernels/flash_attention.py)
rms_norm         RMSNorm forward + backward (kernels/rms_norm.py)
dispatch         what the model calls: Triton on CUDA, PyTorch elsewhere (or forced)

Importing this package never launches or compiles a kernel, so it works on a CPU-only machine;
calling the Triton functions needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors.
"""
from kernels.reference import attention_reference, rms_norm_reference
from kernels.flash_attention import flash_attention
from kernels.rms_norm import rms_norm
from kernels import dispatch
