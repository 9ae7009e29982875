"""Pure-PyTorch references for the Triton kernels: the CPU path and the tests' oracle."""
import torch
import torch.nn.functional as F


def attention_mask(T, S, causal, key_padding_mask, device):
    """Boolean mask (B or 1, 1, T, S), True = may attend, or None when nothing is masked.

    Causal is bottom-right aligned: query i sees key j iff j <= i + (S - T), so a prefill
    after a KV cache (T < S) sees the whole cache.
    """
    mask = None
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        mask = (j <= i + (S - T))[None, None]                    # (1, 1, T, S)
    if key_padding_mask is not None:
        kpm = key_padding_mask.bool()[:, None, None, :]          # (B, 1, 1, S)
        mask = kpm if mask is None else mask & kpm
    return mask


def attention_reference(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v with GQA; rows that see no key give 0.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D); key_padding_mask: (B, S) bool, True = real.
    """
    T, S = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if causal and T == 1 and S >= 1:
        causal = False          # bottom-right aligned: a single query (a decode step) sees every key
    # the plain causal case needs no (T, S) mask: check it before building one
    if causal and key_padding_mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(T, S, causal, key_padding_mask, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    seen = mask.any(-1, keepdim=True)                            # (B, 1, T, 1) rows with >= 1 key
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~seen, scale=scale, enable_gqa=gqa)
    return o.masked_fill(~seen, 0.0)


def rms_norm_reference(x, weight, eps=1e-6):
    """LLaMA RMSNorm in HF's cast order: normalise in fp32, cast back to x.dtype, then * weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
