"""FlashAttention-2 in Triton: fused softmax(q k^T * scale + mask) v, forward and backward.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
  - forward  = Algorithm 1: each program owns a block of BLOCK_M query rows, streams the key/value
    blocks through SRAM with an online softmax (running max m, running sum l, unnormalised
    accumulator), divides by l once at the end and saves the log-sum-exp L = m + log(l).
  - backward = Algorithm 2 with recomputation: P is rebuilt from q, k and L instead of being stored.
    A preprocess kernel computes D = rowsum(dO * O); one kernel owns a key block and loops over the
    query blocks to accumulate dK, dV; another owns a query block and loops over the key blocks to
    accumulate dQ. No atomics: every output block is written by exactly one program.

Beyond the paper:
  - GQA: query head h reads kv head h // group; K and V are never repeated in memory. The dK/dV
    program loops over the `group` query heads that share its kv head and sums their contributions.
  - causal masking is bottom-right aligned (query i sees key j iff j <= i + S - T), so a prefill
    that follows a KV cache (T < S) sees the whole cache.
  - key_padding_mask (B, S) bool, True = real key. A query row that sees no key at all outputs 0
    and gets zero gradient: its L is stored as +inf, which makes every recomputed P zero.
  - any T, S (loads and stores are masked at block edges, e.g. ViT's 577 tokens) and any head dim
    (the head dim is padded to BLOCK_D = next power of two with masks: 64, 80, 96, 128, ...).
  - fp32 / fp16 / bf16 inputs; matmuls accumulate in fp32, the softmax runs in fp32.

Exponentials use exp2 with the scale folded into log2(e) * scale (as the Triton tutorial does);
L is kept in those base-2 units internally.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST_DOT works around the Triton 3.9 CPU interpreter, whose
    dot multiplies bf16 bit patterns as integers: bf16 tiles are widened to fp32 first (exact, and
    the same products a bf16 tensor-core MMA with fp32 accumulation computes). Never set on a GPU."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _key_ok(KPM_row, offs_n, S, HAS_KPM: tl.constexpr):
    """Keys offs_n that exist (< S) and are not padding (key_padding_mask True); any shape."""
    ok = offs_n < S
    if HAS_KPM:
        ok = ok & (tl.load(KPM_row + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _valid_mask(offs_q, offs_k, key_ok, T, S, CAUSAL: tl.constexpr):
    """Bool tile: query offs_q may attend key offs_k. Index tensors come pre-broadcast, (M, 1) x
    (1, N) for a score tile or (1, M) x (N, 1) for a transposed one, so no tile is transposed."""
    valid = (offs_q < T) & key_ok
    if CAUSAL:
        valid = valid & (offs_k <= offs_q + (S - T))                          # bottom-right aligned
    return valid


@triton.jit
def _fwd_kernel(
    Q, K, V, O, L, KPM,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_kpmb,
    H, T, S, D, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Algorithm 1: one program = one (batch, query head, block of BLOCK_M query rows)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP                                                         # GQA: shared kv head

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    # Alg 1 line 4: load Q_i (BLOCK_M, BLOCK_D) once; it stays in SRAM for the whole loop
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    kpm_row = KPM + b * stride_kpmb

    # Alg 1 line 5: running max m, running sum l, unnormalised output acc (all fp32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # causal: keys beyond the last row's diagonal are never seen by this block, skip them
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + (S - T))
    for start_n in range(0, hi, BLOCK_N):                                     # Alg 1 line 6
        offs_n = start_n + offs_n0
        # K_j^T (BLOCK_D, BLOCK_N) and V_j (BLOCK_N, BLOCK_D)
        kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=(offs_n[:, None] < S) & d_ok[None, :], other=0.0)
        # Alg 1 line 8: S_ij = Q_i K_j^T (scaled, base 2), masked keys -> -inf
        qk = _dot(q, kT, DOT_PRECISION, UPCAST_DOT) * qk_scale
        key_ok = _key_ok(kpm_row, offs_n[None, :], S, HAS_KPM)
        valid = _valid_mask(offs_m[:, None], offs_n[None, :], key_ok, T, S, CAUSAL)
        qk = tl.where(valid, qk, float("-inf"))
        # Alg 1 line 9: new running max; a row that has seen no key yet keeps m = -inf, and we
        # subtract 0 instead so that exp2(-inf - -inf) = NaN never happens
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_sub[:, None])                                       # P~_ij
        alpha = tl.exp2(m_i - m_sub)                                          # rescale old stats
        # Alg 1 line 10: l = e^(m_old - m_new) l + rowsum(P~), O = diag(e^(m_old - m_new)) O + P~ V
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    # Alg 1 lines 12-13: O_i = diag(l)^-1 O_i, L_i = m + log(l); rows that saw nothing: O = 0, L = +inf
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & d_ok[None, :])
    tl.store(L + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, H, T, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Alg 2 line 4: D_i = rowsum(dO_i * O_i) in fp32 (O and dO share one layout)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, L, DELTA, KPM, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_kpmb,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, T, S, D, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Alg 2 outer loop: one program = one (batch, kv head, block of BLOCK_N keys); loops over the
    GROUP query heads sharing this kv head and over their query blocks. dK, dV live in SRAM (fp32).

    Scores are computed transposed ((BLOCK_N, BLOCK_M) = keys x queries), so P^T and dS^T come
    out already in the orientation the dots dV = P^T dO and dK = dS^T Q need; Q and dO tiles are
    loaded transposed, and tl.trans only hands the matrix unit their other orientation.
    """
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)                                                 # over B * Hkv
    H_kv = H // GROUP
    b = (pid_bh // H_kv).to(tl.int64)
    h_kv = (pid_bh % H_kv).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < S

    # Alg 2 line 6: load K_j, V_j (BLOCK_N, BLOCK_D); init dK_j, dV_j = 0
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    key_okT = _key_ok(KPM + b * stride_kpmb, offs_n[:, None], S, HAS_KPM)     # (BLOCK_N, 1), once

    # causal: query i sees key j iff i >= j - (S - T); earlier query blocks contribute nothing
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, start_n - (S - T))
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):                                                    # GQA: sum over heads
        h = h_kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_ob + h * stride_oh
        row_base = (b * H + h) * T                                           # into L, DELTA
        for start_m in range(lo, T, BLOCK_M):                                 # Alg 2 line 7
            offs_m = start_m + offs_m0
            m_ok = offs_m < T
            # Q_i^T, dO_i^T (BLOCK_D, BLOCK_M); L_i, D_i (BLOCK_M,)
            qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None],
                         mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            doT = tl.load(do_base + offs_m[None, :] * stride_ot + offs_d[:, None],
                          mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            lse = tl.load(L + row_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            # Alg 2 lines 9-10: recompute P_ij^T = exp(S_ij^T - L_i) (zero where masked)
            qkT = _dot(k, qT, DOT_PRECISION, UPCAST_DOT) * qk_scale   # (BLOCK_N, BLOCK_M)
            validT = _valid_mask(offs_m[None, :], offs_n[:, None], key_okT, T, S, CAUSAL)
            pT = tl.exp2(tl.where(validT, qkT, float("-inf")) - lse[None, :])
            # Alg 2 line 11: dV_j += P_ij^T dO_i
            dv += _dot(pT.to(doT.dtype), tl.trans(doT), DOT_PRECISION, UPCAST_DOT)
            # Alg 2 lines 12-13: dP_ij^T = V_j dO_i^T, dS_ij^T = P^T * (dP^T - D_i)
            dpT = _dot(v, doT, DOT_PRECISION, UPCAST_DOT)
            dsT = pT * (dpT - delta[None, :])
            # Alg 2 line 15: dK_j += dS_ij^T Q_i  (scale applied once at the end)
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), DOT_PRECISION, UPCAST_DOT)

    # Alg 2 line 17: write dK_j, dV_j (dK gets the softmax scale from S = scale * Q K^T)
    out_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, L, DELTA, KPM, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_kpmb,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, S, D, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ_i = sum_j dS_ij K_j: one program = one (batch, query head, block of BLOCK_M rows).

    FlashAttention-2 writes dQ with atomic adds from the dK/dV loop; a separate pass over the keys
    recomputes P once more but needs no atomics and gives deterministic gradients.
    """
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < T
    tile_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=tile_mask, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                 mask=tile_mask, other=0.0)
    row = pid_bh.to(tl.int64) * T + offs_m
    lse = tl.load(L + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    kpm_row = KPM + b * stride_kpmb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + (S - T))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & d_ok[:, None], other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & d_ok[:, None], other=0.0)
        # recompute P_ij = exp(S_ij - L_i); dP_ij = dO_i V_j^T; dS_ij = P_ij * (dP_ij - D_i)
        qk = _dot(q, kT, DOT_PRECISION, UPCAST_DOT) * qk_scale
        key_ok = _key_ok(kpm_row, offs_n[None, :], S, HAS_KPM)
        valid = _valid_mask(offs_m[:, None], offs_n[None, :], key_ok, T, S, CAUSAL)
        p = tl.exp2(tl.where(valid, qk, float("-inf")) - lse[:, None])
        dp = _dot(do, vT, DOT_PRECISION, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        # Alg 2 line 14: dQ_i += dS_ij K_j
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_PRECISION, UPCAST_DOT)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_mask)


def _tiles(D, block_m=None, block_n=None):
    """Tile sizes (BLOCK_M queries x BLOCK_N keys) per kernel, BLOCK_D and warps per program.

    GPU defaults are starting points taken from the Triton fused-attention tutorial, not tuned:
    nothing has been measured on a GPU yet. Forward 128 x 64; the dK/dV kernel keeps a tall K/V
    block resident (its dK, dV accumulators are BLOCK_N x BLOCK_D fp32) and streams short query
    blocks; the dQ kernel is the mirror image. block_m / block_n override every kernel (tests use
    16 or 32 to cross many block edges under the interpreter).
    """
    BLOCK_D = max(16, triton.next_power_of_2(D))
    big = BLOCK_D > 64
    tiles = dict(fwd=(128 if BLOCK_D <= 128 else 64, 64),
                 dkdv=(32, 64 if big else 128),
                 dq=(64 if big else 128, 64 if big else 32))
    if block_m or block_n:
        tiles = {name: (block_m or m, block_n or n) for name, (m, n) in tiles.items()}
    # 8 warps: compiled for sm_90 (bf16, causal + padding + GQA), ptxas reports no register
    # spills for any of these tiles at D = 64 or 128, whereas 4 warps spill at D = 64
    return BLOCK_D, tiles, 8


def _dot_settings(q):
    """(input_precision, upcast): fp32 inputs use exact fp32 dots ("ieee", not TF32) so fp32 means
    fp32; bf16 under the CPU interpreter is upcast (see _dot)."""
    upcast = q.dtype == torch.bfloat16 and not q.is_cuda
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    return precision, upcast


def _launch_settings(num_warps, dtype):
    """Warps per program and software-pipelining depth (the interpreter ignores both). fp32 tiles
    are twice as big: 2 stages keep the D = 128 forward inside the H100's 227 KB shared memory.
    FMA fusion is asked for explicitly (Triton 3.9 warns when it is left to its default)."""
    return dict(num_warps=num_warps, num_stages=2 if dtype == torch.float32 else 3,
                enable_fp_fusion=True)


class FlashAttentionFunction(torch.autograd.Function):
    """autograd wrapper: forward saves (q, k, v, o, L); backward runs the three kernels."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_padding_mask, block_m, block_n):
        B, H, T, D = q.shape
        H_kv, S = k.shape[1], k.shape[2]
        BLOCK_D, tiles, num_warps = _tiles(D, block_m, block_n)
        fwd_m, fwd_n = tiles["fwd"]
        o = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)        # (B, Hq, T, D)
        lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)   # base-2 log-sum-exp
        kpm = key_padding_mask if key_padding_mask is not None else q         # dummy when unused
        precision, upcast = _dot_settings(q)
        grid = (triton.cdiv(T, fwd_m), B * H)
        _fwd_kernel[grid](
            q, k, v, o, lse, kpm,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            kpm.stride(0),
            H, T, S, D, scale * LOG2E,
            GROUP=H // H_kv, CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
            DOT_PRECISION=precision, UPCAST_DOT=upcast, BLOCK_M=fwd_m, BLOCK_N=fwd_n, BLOCK_D=BLOCK_D,
            **_launch_settings(num_warps, q.dtype),
        )
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.causal, ctx.scale, ctx.block_m, ctx.block_n = causal, scale, block_m, block_n
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
        B, H, T, D = q.shape
        H_kv, S = k.shape[1], k.shape[2]
        BLOCK_D, tiles, num_warps = _tiles(D, ctx.block_m, ctx.block_n)
        do = do.contiguous()                                  # same layout as o (contiguous)
        kpm = key_padding_mask if key_padding_mask is not None else q
        precision, upcast = _dot_settings(q)
        common = dict(GROUP=H // H_kv, CAUSAL=ctx.causal, HAS_KPM=key_padding_mask is not None,
                      DOT_PRECISION=precision, UPCAST_DOT=upcast, BLOCK_D=BLOCK_D)

        delta = torch.empty_like(lse)                                         # (B, Hq, T) fp32
        pre_m = tiles["dq"][0]
        _bwd_preprocess_kernel[(triton.cdiv(T, pre_m), B * H)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), H, T, D,
            BLOCK_M=pre_m, BLOCK_D=BLOCK_D, num_warps=4, enable_fp_fusion=True)

        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)           # contiguous grads
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        strides = (q.stride(0), q.stride(1), q.stride(2),
                   k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2),
                   do.stride(0), do.stride(1), do.stride(2),
                   kpm.stride(0))
        (dkdv_m, dkdv_n), (dq_m, dq_n) = tiles["dkdv"], tiles["dq"]
        _bwd_dkdv_kernel[(triton.cdiv(S, dkdv_n), B * H_kv)](
            q, k, v, do, lse, delta, kpm, dk, dv, *strides, *dk.stride()[:3], *dv.stride()[:3],
            H, T, S, D, ctx.scale * LOG2E, ctx.scale,
            BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, **common, **_launch_settings(num_warps, q.dtype))
        _bwd_dq_kernel[(triton.cdiv(T, dq_m), B * H)](
            q, k, v, do, lse, delta, kpm, dq, *strides, *dq.stride()[:3],
            H, T, S, D, ctx.scale * LOG2E, ctx.scale,
            BLOCK_M=dq_m, BLOCK_N=dq_n, **common, **_launch_settings(num_warps, q.dtype))
        return dq, dk, dv, None, None, None, None, None


def _check(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be (B, H, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"(B={B}, Hkv, S, D={D})")
    if H % k.shape[1] != 0:
        raise ValueError(f"flash_attention: {H} query heads not a multiple of {k.shape[1]} kv heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16,
                                                              torch.bfloat16):
        raise ValueError(f"flash_attention: q, k, v must share one of fp32/fp16/bf16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"flash_attention: key_padding_mask must be (B, S) = {(B, k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")


def flash_attention(q, k, v, causal=False, scale=None, key_padding_mask=None,
                    block_m=None, block_n=None):
    """FlashAttention-2: softmax(q k^T * scale + mask) v, differentiable in q, k, v.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 (GQA without repeating K/V).
    causal: bottom-right aligned, query i sees key j iff j <= i + (S - T).
    scale: softmax scale, default 1 / sqrt(D).
    key_padding_mask: optional (B, S) bool, True = real key. Rows that see no key return 0.
    block_m, block_n: tile sizes override (tests; powers of two >= 16).
    Returns (B, Hq, T, D) in q's dtype. Works on CUDA tensors, or on CPU under TRITON_INTERPRET=1.
    """
    _check(q, k, v, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # the kernels index the head dim with stride 1; any other layout (e.g. (B, T, H, D) transposed
    # to (B, H, T, D)) is read in place through its strides
    q, k, v = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, key_padding_mask,
                                        block_m, block_n)
