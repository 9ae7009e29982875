"""Pure-PyTorch references for the Triton kernels: the CPU path and the tests' oracle."""
import torch
import torch.nn.functional as F


def segment_ids_from_cu_seqlens(cu_seqlens, total_len):
    """Packed-sequence boundaries (FlashAttention's varlen `cu_seqlens`) -> segment ids.

    cu_seqlens: (N + 1,) or (B, N + 1) int, cumulative lengths starting at 0: sequence i of a row
    occupies positions [cu_seqlens[i], cu_seqlens[i + 1]). Positions from cu_seqlens[-1] up to
    total_len are padding. Returns (1, total_len) or (B, total_len) int32 segment ids: the index i
    of the sequence each position belongs to, -1 for padding (see attention_mask).
    """
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() not in (1, 2) or cu.shape[-1] < 1 or cu.is_floating_point():
        raise ValueError(f"cu_seqlens must be an int (N + 1,) or (B, N + 1) tensor, got "
                         f"{cu.dtype} {tuple(cu.shape)}")
    cu = cu.reshape(-1, cu.shape[-1]).long()                              # (B, N + 1)
    if (cu[:, 0] != 0).any() or (cu.diff(dim=-1) < 0).any() or (cu[:, -1] > total_len).any():
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end <= total_len="
                         f"{total_len}, got {cu.tolist()}")
    positions = torch.arange(total_len, device=cu.device).expand(cu.shape[0], total_len)
    # number of sequence ends <= p = index of the sequence holding p (N past the last one)
    ids = torch.searchsorted(cu[:, 1:].contiguous(), positions.contiguous(), right=True)
    return torch.where(positions < cu[:, -1:], ids, -1).to(torch.int32)   # (B, total_len)


def check_segment_ids(segment_ids, B, T, S, where):
    """Raise a ValueError unless segment_ids is a (B, T) integer tensor and T == S."""
    if segment_ids is None:
        return
    dtype = segment_ids.dtype
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"{where}: segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if tuple(segment_ids.shape) != (B, T):
        raise ValueError(f"{where}: segment_ids must be (B, T) = {(B, T)}, got "
                         f"{tuple(segment_ids.shape)}")
    if T != S:
        raise ValueError(f"{where}: segment_ids (packed sequences) need as many queries as keys "
                         f"(no KV cache), got T={T} queries and S={S} keys")


def attention_mask(T, S, causal, key_padding_mask, device, segment_ids=None):
    """Boolean mask (B or 1, 1, T, S), True = may attend, or None when nothing is masked.

    Causal is bottom-right aligned: query i sees key j iff j <= i + (S - T), so a prefill
    after a KV cache (T < S) sees the whole cache.
    segment_ids (B, T) int, T == S: several sequences packed into one row (document masking):
    query i sees key j only if segment_ids[b, i] == segment_ids[b, j]; a negative id is padding,
    which sees no key and is seen by no query.
    """
    mask = None
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        mask = (j <= i + (S - T))[None, None]                    # (1, 1, T, S)
    if key_padding_mask is not None:
        kpm = key_padding_mask.bool()[:, None, None, :]          # (B, 1, 1, S)
        mask = kpm if mask is None else mask & kpm
    if segment_ids is not None:
        check_segment_ids(segment_ids, segment_ids.shape[0], T, S, "attention_mask")
        seg = segment_ids[:, None, :, None]                      # (B, 1, T, 1) query ids
        seg_k = segment_ids[:, None, None, :]                    # (B, 1, 1, S) key ids
        same = (seg == seg_k) & (seg_k >= 0)                     # (B, 1, T, S)
        mask = same if mask is None else mask & same
    return mask


def attention_reference(q, k, v, causal=False, key_padding_mask=None, scale=None,
                        segment_ids=None):
    """softmax(q k^T * scale + mask) v with GQA; rows that see no key give 0.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D); key_padding_mask: (B, S) bool, True = real;
    segment_ids: (B, T) int for packed sequences, -1 = padding (see attention_mask).
    """
    T, S = q.shape[-2], k.shape[-2]
    check_segment_ids(segment_ids, q.shape[0], T, S, "attention_reference")
    gqa = q.shape[1] != k.shape[1]
    if causal and T == 1 and S >= 1:
        causal = False          # bottom-right aligned: a single query (a decode step) sees every key
    # the plain causal case needs no (T, S) mask: check it before building one
    if causal and key_padding_mask is None and segment_ids is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(T, S, causal, key_padding_mask, q.device, segment_ids)
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
