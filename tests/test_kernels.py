"""Triton kernels (kernels/flash_attention.py, kernels/rms_norm.py) against float64 PyTorch.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 so the same kernels run
through Triton's CPU interpreter. Shapes are tiny (the interpreter is slow) and the tile sizes are
shrunk to 16/32 so that every test still crosses several block edges. Those small tiles compile
to other GPU instructions (Ampere mma.sync) than the default tiles the model runs with (Hopper
wgmma), so the last tests, CUDA only, check the default tiles at the real LLaVA shapes.

Interpreter caveats (Triton 3.9), found while writing these tests:
  - tl.dot on bf16 multiplies the raw bit patterns; kernels/flash_attention.py widens bf16 tiles
    to fp32 before the dot on CPU tensors (_dot, UPCAST_DOT), never on a GPU;
  - fp32 -> bf16 casts truncate instead of rounding to nearest even, so bf16 results may sit one
    bf16 ulp away from PyTorch's; the bf16 tolerances below allow for that.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nanollava.kernels import dispatch
from nanollava.kernels.flash_attention import flash_attention
from nanollava.kernels.reference import attention_reference, rms_norm_reference
from nanollava.kernels.rms_norm import rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |triton - float64| <= atol + rtol * |float64| per element; a 40-case random sweep of the
# attention test peaked at 0.3 of these bounds (fp32, fp16 and bf16 alike)
ATTN_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
RMS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# no shrinking: under the interpreter it takes minutes; a failure prints its full example anyway
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.reuse, Phase.generate])


def _key_padding_mask(pattern, B, S, gen):
    """(B, S) bool, True = real key. left/right: random real lengths in [0, S] (0 = a fully
    padded sequence, so every query row of it sees no key); `empty`: the first sequence is all
    padding; `none`: no mask at all."""
    if pattern == "none":
        return None
    lengths = torch.randint(0, S + 1, (B,), generator=gen)
    j = torch.arange(S)[None, :]
    if pattern == "right":
        mask = j < lengths[:, None]
    elif pattern == "left":
        mask = j >= (S - lengths)[:, None]
    else:  # "empty"
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[0] = False
    return mask.to(DEVICE)


def _assert_close(name, got, want, tol, context, torch_err=None):
    """|got - want| <= atol + rtol * |want| per element (want is float64), or, for fp16 / bf16,
    a max error no larger than 3x PyTorch's own max error computing the same thing in that dtype
    (the FlashAttention repo's criterion: long sums in bf16 err in proportion to their size)."""
    atol, rtol = tol
    assert not torch.isnan(got).any(), f"{name} has NaN ({context})"
    err = (got.double() - want).abs()
    if (err <= atol + rtol * want.abs()).all():
        return
    assert torch_err is not None and err.max().item() <= 3 * torch_err, (
        f"{name}: max error {err.max().item():.3g} exceeds atol={atol} rtol={rtol}"
        + ("" if torch_err is None else f" and 3x PyTorch's own error {torch_err:.3g}")
        + f" ({context})")


def _check_attention(B, Hkv, group, T, S, D, causal, pattern, dtype, block, seed):
    """flash_attention forward and dq, dk, dv against the float64 reference on the same inputs;
    block = (BLOCK_M, BLOCK_N) tile sizes for every kernel."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * group, T, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    do = torch.randn(B, Hkv * group, T, D, generator=gen)
    kpm = _key_padding_mask(pattern, B, S, gen)
    q, k, v, do = [x.to(DEVICE, dtype) for x in (q, k, v, do)]
    q, k, v = [x.requires_grad_() for x in (q, k, v)]

    o = flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, block_m=block[0],
                        block_n=block[1])
    o.backward(do)

    def reference(dtype):  # (out, dq, dk, dv) of the PyTorch reference computed in `dtype`
        q_, k_, v_ = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o_ = attention_reference(q_, k_, v_, causal=causal, key_padding_mask=kpm)
        o_.backward(do.to(dtype))
        return o_.detach(), q_.grad, k_.grad, v_.grad

    want = reference(torch.float64)
    same_dtype = reference(dtype) if dtype != torch.float32 else None
    context = (f"B={B} Hq={Hkv * group} Hkv={Hkv} T={T} S={S} D={D} causal={causal} "
               f"padding={pattern} {dtype} block={block}")
    assert o.dtype == dtype and o.shape == q.shape, context
    for i, (name, got) in enumerate((("out", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))):
        torch_err = None if same_dtype is None else (same_dtype[i].double() - want[i]).abs().max().item()
        _assert_close(name, got, want[i], ATTN_TOL[dtype], context, torch_err)


@settings(max_examples=14, **HYPOTHESIS)
@given(B=st.integers(1, 2), heads=st.sampled_from([(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)]),
       T=st.sampled_from([1, 2, 15, 16, 17, 31, 33, 65]),
       S=st.sampled_from([1, 2, 15, 16, 17, 31, 33, 65]),
       D=st.sampled_from([16, 64, 80]), causal=st.booleans(),
       pattern=st.sampled_from(["none", "right", "left", "empty"]),
       dtype=st.sampled_from(DTYPES), block=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
       seed=st.integers(0, 2**16))
def test_flash_attention_matches_float64_reference(B, heads, T, S, D, causal, pattern, dtype,
                                                   block, seed):
    Hkv, group = heads                                        # group = Hq / Hkv query heads per kv head
    _check_attention(B, Hkv, group, T, S, D, causal, pattern, dtype, block, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_gqa_causal_padded_each_dtype(dtype):
    """Every feature at once, once per dtype: GQA 4:2, T != S causal, left padding, D = 80."""
    _check_attention(B=2, Hkv=2, group=2, T=17, S=33, D=80, causal=True, pattern="left",
                     dtype=dtype, block=(16, 32), seed=0)


def test_flash_attention_rows_that_see_no_key_are_zero_with_zero_gradient():
    """A fully padded sequence, and causal T > S (the first T - S queries see nothing): O = 0,
    dq = 0 on those rows, nothing NaN."""
    q = torch.randn(2, 2, 20, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 1, 12, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 1, 12, 16, device=DEVICE, requires_grad=True)
    kpm = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    kpm[1] = False
    o = flash_attention(q, k, v, causal=True, key_padding_mask=kpm, block_m=16, block_n=16)
    o.sum().backward()
    blind = torch.zeros(2, 1, 20, 1, dtype=torch.bool, device=DEVICE)
    blind[0, :, :8] = True                       # query i sees key j iff j <= i - 8
    blind[1] = True                              # every key is padding
    for name, t in (("out", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    assert (o.masked_select(blind) == 0).all(), "rows that see no key must output 0"
    assert (q.grad.masked_select(blind) == 0).all(), "rows that see no key must get zero dq"
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all(), "padding keys must get zero dk, dv"


def test_flash_attention_reads_strided_inputs_with_default_tiles_and_scale():
    """q, k, v as (B, T, H, D) views transposed to (B, H, T, D), as the model passes them; the
    default (GPU) tile sizes; an explicit softmax scale; decode-like T = 1 after S = 40 keys."""
    qkv = torch.randn(2, 40, 3, 4, 64, device=DEVICE)                # (B, T, 3, H, D)
    q, k, v = [t.transpose(1, 2).requires_grad_() for t in qkv.unbind(2)]  # (B, H, T, D) views
    for q_, causal in ((q, False), (q[:, :, -1:], True)):
        o = flash_attention(q_, k, v, causal=causal, scale=0.3)
        ref = attention_reference(q_.double(), k.double(), v.double(), causal=causal, scale=0.3)
        _assert_close("out", o, ref, ATTN_TOL[torch.float32], f"T={q_.shape[2]}")
    o.sum().backward()
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_reference(q64[:, :, -1:], k64, v64, causal=True, scale=0.3).sum().backward()
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        _assert_close(name, got, want, ATTN_TOL[torch.float32], "strided decode")


def test_flash_attention_rejects_bad_shapes_with_a_clear_message():
    q = torch.randn(1, 3, 4, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16),
                        key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


def _check_rms_norm(shape, x_dtype, w_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (3 * torch.randn(*shape, generator=gen)).to(DEVICE, x_dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(N, generator=gen)).to(DEVICE, w_dtype).requires_grad_()
    eps = 1e-5
    y = rms_norm(x, w, eps)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    y.backward(dy)

    context = f"shape={shape} x={x_dtype} weight={w_dtype}"
    assert y.dtype == torch.promote_types(x_dtype, w_dtype), f"output dtype {y.dtype} ({context})"
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    # float64 oracle that keeps HF's cast back to x.dtype, so only the kernel's own error remains
    rstd64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y64 = w64 * (x64 * rstd64).to(x_dtype).double()
    (w64 * x64 * rstd64).backward(dy.double())
    tol = RMS_TOL[x_dtype]                   # x.dtype is the least precise dtype in every case
    _assert_close("y", y, y64.detach(), tol, context)
    _assert_close("dx", x.grad, x64.grad, tol, context)
    # dweight sums one rounding of cast(x * rstd) per row
    _assert_close("dweight", w.grad, w64.grad, (tol[0] * max(4, shape[0]), tol[1]), context)


@settings(max_examples=12, **HYPOTHESIS)
@given(rows=st.sampled_from([1, 3, 7, 16, 33]), N=st.sampled_from([1, 7, 33, 64, 100, 128]),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.float16, torch.float16),
                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                               (torch.float16, torch.float32)]),
       seed=st.integers(0, 2**16))
def test_rms_norm_matches_float64_reference(rows, N, dtypes, seed):
    _check_rms_norm((rows, N), *dtypes, seed)


def test_rms_norm_casts_back_to_x_dtype_before_the_weight_like_hf():
    """fp16 activations, fp32 weight (a LLaMA norm kept in fp32): HF rounds x * rstd to fp16 and
    only then multiplies by the fp32 weight, returning fp32. The kernel matches that order (to fp32
    rounding of rstd) and is measurably different from normalising and scaling all in fp32."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 96, generator=gen).to(DEVICE, torch.float16)          # (B, T, C)
    w = (1 + torch.randn(96, generator=gen)).to(DEVICE)
    y = rms_norm(x, w, 1e-6)
    hf = rms_norm_reference(x, w, 1e-6)
    xf = x.float()
    all_fp32 = w * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)   # the wrong order
    assert y.shape == x.shape and y.dtype == hf.dtype == torch.float32

    def fraction_equal(a, b):  # equal up to fp32 rounding; a rare fp16 tie may round the other way
        return ((a - b).abs() <= 1e-6 * b.abs() + 1e-7).float().mean().item()
    assert fraction_equal(y, hf) >= 0.99, "kernel does not follow HF's cast order"
    assert fraction_equal(y, all_fp32) < 0.5, "the test cannot tell the two orders apart"
    torch.testing.assert_close(y, hf, atol=1e-5, rtol=2e-3)                  # 2 fp16 ulps at most


def test_dispatch_forced_triton_matches_torch():
    """dispatch.use("triton") routes both ops to the kernels; use("torch") to the references."""
    q = torch.randn(1, 4, 9, 16, device=DEVICE, requires_grad=True)
    k, v = torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 9, 16, device=DEVICE)
    kpm = torch.tensor([[False, False] + [True] * 7], device=DEVICE)
    x, w = torch.randn(3, 24, device=DEVICE), torch.randn(24, device=DEVICE)
    with dispatch.use("torch"):
        o_torch = dispatch.attention(q, k, v, causal=True, key_padding_mask=kpm)
        y_torch = dispatch.rms_norm(x, w, 1e-5)
    with dispatch.use("triton"):
        assert dispatch.use_triton(q)
        o_triton = dispatch.attention(q, k, v, causal=True, key_padding_mask=kpm)
        y_triton = dispatch.rms_norm(x, w, 1e-5)
    assert "FlashAttention" in type(o_triton.grad_fn).__name__, "use('triton') did not reach the kernel"
    torch.testing.assert_close(o_triton, o_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_triton, y_torch, atol=1e-5, rtol=1e-5)


def test_dispatch_auto_sends_cuda_bf16_fp16_to_triton_and_fp32_attention_to_pytorch():
    """auto: CPU tensors never reach Triton; on CUDA, fp32 attention goes to SDPA (the fp32
    kernels spill and do not launch on 99 KB-shared-memory GPUs), everything else to Triton."""
    from types import SimpleNamespace
    with dispatch.use("auto"):
        for dtype in DTYPES:
            cuda, cpu = SimpleNamespace(is_cuda=True, dtype=dtype), SimpleNamespace(is_cuda=False, dtype=dtype)
            assert dispatch.use_triton(cuda, attention=True) == (dtype != torch.float32), dtype
            assert dispatch.use_triton(cuda) and not dispatch.use_triton(cpu) and not dispatch.use_triton(cpu, True)
    with dispatch.use("triton"):
        assert dispatch.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float32), attention=True)


def test_tiny_llava_logits_and_gradients_match_between_triton_and_torch(monkeypatch):
    """The whole model with dispatch forced to Triton (vision tower: non-causal attention; LM:
    causal GQA attention with left padding, RMSNorm) equals the PyTorch path, loss gradients too."""
    from nanollava import LLaVA, LLaVAConfig, TextConfig, VisionConfig
    # cuDNN runs the fp32 patch-embedding conv in TF32 by default: its weight gradient would then
    # round the two paths' (slightly different) upstream gradients apart
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    torch.manual_seed(0)
    V, image_token_id = 64, 63
    config = LLaVAConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=28, patch_size=14),
        text=TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        image_token_id=image_token_id)
    model = LLaVA(config).to(DEVICE)
    n_img = (28 // 14) ** 2                                          # 4 visual tokens per image
    input_ids = torch.randint(3, V - 1, (2, 13), device=DEVICE)
    input_ids[:, 2:2 + n_img] = image_token_id
    input_ids[1, :2] = 0                                             # left padding in row 1
    attention_mask = torch.ones(2, 13, dtype=torch.long, device=DEVICE)
    attention_mask[1, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    pixel_values = torch.randn(2, 3, 28, 28, device=DEVICE)

    results = {}
    for impl in ("torch", "triton"):
        model.zero_grad()
        with dispatch.use(impl):
            logits = model(input_ids, pixel_values, attention_mask=attention_mask)
            model.loss(input_ids, labels, pixel_values, attention_mask=attention_mask).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (logits.detach(), grads)
    (logits_torch, grads_torch), (logits_triton, grads_triton) = results["torch"], results["triton"]
    torch.testing.assert_close(logits_triton, logits_torch, atol=1e-4, rtol=1e-4)
    assert grads_triton.keys() == grads_torch.keys() and len(grads_torch) > 20
    for name in grads_torch:
        torch.testing.assert_close(grads_triton[name], grads_torch[name], atol=1e-4, rtol=1e-3,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


# ---- CUDA only: the default tiles at the real shapes --------------------------------------------

# (name, B, Hq, Hkv, T, S, D, causal, right padding)
REAL_SHAPES = [
    ("CLIP ViT-L/336", 4, 16, 16, 577, 577, 64, False, False),
    ("Vicuna-7B 2048", 2, 32, 32, 2048, 2048, 128, True, False),
    ("Vicuna-7B padded", 2, 32, 32, 1000, 1000, 128, True, True),
    ("GQA 32q/4kv", 2, 32, 4, 2048, 2048, 128, True, False),
    ("decode T=1", 4, 32, 32, 1, 613, 128, True, True),
    ("head dim 80", 2, 8, 8, 333, 333, 80, True, False),
]
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: the default tiles compile to "
                                "tensor-core code only there, and the interpreter would take hours at these shapes")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", REAL_SHAPES, ids=[c[0] for c in REAL_SHAPES])
def test_default_tiles_at_real_shapes_match_fp32_and_are_deterministic(case, dtype):
    """flash_attention with its default (GPU) tiles, many blocks per sequence: out, dq, dk, dv
    within the dtype's tolerance of an fp32 reference (relative to its largest value), or no
    worse than 3x PyTorch's own error in that dtype; two runs bitwise equal (no atomics)."""
    name, B, Hq, Hkv, T, S, D, causal, pad = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = [torch.randn(B, h, n, D, device="cuda", generator=g, dtype=dtype)
                   for h, n in ((Hq, T), (Hkv, S), (Hkv, S), (Hq, T))]
    kpm = None
    if pad:                                                        # row b loses its last 7 * b keys
        lengths = torch.tensor([S - 7 * b for b in range(B)], device="cuda")
        kpm = torch.arange(S, device="cuda")[None] < lengths[:, None]

    def run(attention, dt):
        q_, k_, v_ = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        o = attention(q_, k_, v_, causal=causal, key_padding_mask=kpm)
        o.backward(do.to(dt))
        return [t.detach().float() for t in (o, q_.grad, k_.grad, v_.grad)]

    got, again = run(flash_attention, dtype), run(flash_attention, dtype)
    want, same_dtype = run(attention_reference, torch.float32), run(attention_reference, dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for what, a, b, w, t in zip(("out", "dq", "dk", "dv"), got, again, want, same_dtype):
        assert torch.equal(a, b), f"{name} {what}: two runs differ"
        assert torch.isfinite(a).all(), f"{name} {what}: not finite"
        scale = w.abs().max().clamp(min=1e-6)
        err, torch_err = ((a - w).abs().max() / scale).item(), ((t - w).abs().max() / scale).item()
        assert err < tol or err <= 3 * torch_err, (
            f"{name} {what} {dtype}: max error {err:.2e} of the largest value, PyTorch's own {torch_err:.2e}")


@needs_cuda
@pytest.mark.parametrize("M, N", [(16384, 4096), (4096, 5120)])
def test_rms_norm_at_llama_shapes_matches_reference(M, N):
    """RMSNorm forward and backward at LLaMA-7B/13B widths, bf16, against the HF-order reference."""
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(N, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (rms_norm, rms_norm_reference):
        x.grad = w.grad = None
        y = fn(x, w, 1e-5)
        y.backward(dy)
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for what, a, b in zip(("y", "dx", "dweight"), *outs):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < 3e-2, f"rms_norm {M}x{N} {what}: max error {err:.2e} of the largest value"
