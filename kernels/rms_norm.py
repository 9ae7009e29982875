"""RMSNorm in Triton (Zhang & Sennrich 2019, as LLaMA uses it), forward and backward.

y = weight * cast(x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps), in HF LlamaRMSNorm's order:
statistics and normalisation in fp32, cast back to x.dtype, then multiply by weight, the result
in torch's promotion of (weight.dtype, x.dtype). The kernel reproduces the two roundings exactly
(the product of two bf16/fp16 numbers is exact in fp32, so fp32 multiply + one rounding = torch).

Backward (the cast is treated as identity, as autograd does), with n = x * rstd and g = dy * weight:
    dx = rstd * (g - n * mean(g * n))          per row
    dweight = sum over rows of dy * cast(n)    in two stages: each program sums its block of rows
                                               into one row of a (n_programs, N) fp32 buffer, then
                                               the buffer is summed over programs.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    """One program = one row: rstd in fp32, y = w * cast(x * rstd)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    n = (xf * rstd).to(x.dtype).to(tl.float32)                       # HF: cast back to x.dtype
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * n).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, stride_x, stride_dy, stride_dx,
                         M, N, rows_per_program, BLOCK_N: tl.constexpr):
    """One program = a block of rows: dx per row, and this block's partial sum of dweight."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program                    # int64: M * N may be > 2^31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = xf * rstd
        dw += dy * n.to(x.dtype).to(tl.float32)                      # d(w * cast(n)) / dw
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, 0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _num_programs(x, M):
    """Backward programs: one per SM on a GPU (each loops over M / n_SM rows), a few on CPU."""
    if x.is_cuda:
        n = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        n = 4
    return max(1, min(n, M))


def _num_warps(BLOCK_N):
    """Warps per row program, growing with the row so each thread holds 8-32 elements."""
    return 4 if BLOCK_N <= 2048 else (8 if BLOCK_N <= 8192 else 16)


class RMSNormFunction(torch.autograd.Function):
    """autograd wrapper: forward saves (x, weight, rstd); backward is one kernel + a sum."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        N = shape[-1]
        x2 = x.reshape(-1, N)                                         # (M, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((M, N), device=x.device, dtype=out_dtype)
        rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
        BLOCK_N = triton.next_power_of_2(N)
        _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps,
                                   BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N),
                                   enable_fp_fusion=True)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
        n_programs = _num_programs(x2, M)
        rows_per_program = triton.cdiv(M, n_programs)
        n_programs = triton.cdiv(M, rows_per_program)
        dw_partial = torch.empty((n_programs, N), device=x2.device, dtype=torch.float32)
        BLOCK_N = triton.next_power_of_2(N)
        _rms_norm_bwd_kernel[(n_programs,)](
            x2, weight, dy2, rstd, dx, dw_partial, x2.stride(0), dy2.stride(0), dx.stride(0),
            M, N, rows_per_program, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N),
            enable_fp_fusion=True)
        dweight = dw_partial.sum(0).to(weight.dtype)                  # stage 2 of dweight
        return dx.reshape(ctx.shape), dweight, None


def rms_norm(x, weight, eps=1e-6):
    """LLaMA RMSNorm over the last dim in HF's cast order; differentiable in x and weight.

    x: (..., N) fp32/fp16/bf16; weight: (N,). Returns (..., N) in promote(weight.dtype, x.dtype).
    Works on CUDA tensors, or on CPU under TRITON_INTERPRET=1.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be (N,) with N = last dim "
                         f"of x {tuple(x.shape)}")
    if x.numel() == 0:
        return weight * x
    return RMSNormFunction.apply(x, weight, float(eps))
