"""LLaMA decoder (Touvron et al. 2023), the language model of LLaVA (Vicuna-7B/13B v1.5).

RMSNorm (fp32 normalise, HF cast order), rotary position embeddings in HF's rotate-half layout
(HF q/k weights are already in it: never permute them), grouped-query attention
(num_key_value_heads), SwiGLU MLP `down(silu(gate(x)) * up(x))`, optional biases (HF
`attention_bias` on q/k/v/o, Qwen2's q/k/v bias), tied or untied lm_head, and a preallocated
static KV cache (gpt-fast style) for prefill + one-token decode. Mistral is this model with a
sliding window, which equals full causal attention on sequences that fit in the window: longer
ones are refused (`TextConfig.context_length`). Parameter names mirror HF's LlamaForCausalLM
(`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanollava.kernels import dispatch


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return dispatch.rms_norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """Preallocated keys/values for every layer: k, v of shape (n_layers, B, Hkv, max_len, D).

    `pos` counts the tokens already written; a forward of T tokens writes [pos, pos+T),
    attends over [0, pos+T) and then advances `pos` by T.
    """

    def __init__(self, batch, max_len, n_layers, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        # empty, not zeros: only [0, pos+T) is ever read and every forward writes it first
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer, pos, k, v):
        """Write k, v (B, Hkv, T, D) at [pos, pos+T) of `layer`; return that layer's [0, pos+T)."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to position {end} but max_len is {self.max_len}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """RoPE angles pos * theta^(-2i/d), computed in fp32 as HF does, as (B, T, D) cos and sin."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq                   # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                              # (B, T, D) rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, D); cos, sin (B, T, D). HF's `x * cos + rotate_half(x) * sin` with
    rotate_half(x) = cat(-x2, x1), bit for bit, without materialising rotate_half(x) (a neg, a cat
    and a full-size mul fewer): the halves of x * cos get -x2 * sin and + x1 * sin in place."""
    cos, sin = cos[:, None], sin[:, None]
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h] -= x[..., h:] * sin[..., :h]
    out[..., h:] += x[..., :h] * sin[..., h:]
    return out


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C, qkv_bias = config.hidden_size, config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=config.attention_bias)

    def forward(self, x, cos, sin, key_padding_mask=None, kv_cache=None, pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            # also in the prefill: SDPA on CPU is faster on the cache's per-head contiguous (T, D)
            # blocks than on the fresh k, v (views of the (B, T, H*D) projection, row stride H*D)
            k, v = kv_cache.update(self.layer_idx, pos, k, v)                         # (B, Hkv, pos+T, D)
        y = dispatch.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, key_padding_mask=None, kv_cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, kv_cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, kv_cache=None):
        """Final-norm hidden states (B, T, C).

        attention_mask: (B, pos+T), 1 = real token, 0 = padding (pos = tokens already in kv_cache).
        position_ids default to attention_mask.cumsum(-1) - 1 clamped at 0 (left padding correct),
        else pos + arange(T).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds      # (B, T, C)
        B, T, _ = x.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.config.context_length:
            raise ValueError(f"a sequence of {pos + T} tokens is longer than this model's context of "
                             f"{self.config.context_length} (max_position_embeddings / sliding_window)")
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, pos + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, pos + T)} "
                                 f"(batch, cached + new tokens)")
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, pos:]
            if not attention_mask.bool().all():          # all-real masks take the faster unmasked path
                key_padding_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(pos, pos + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, key_padding_mask, kv_cache, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, key_padding_mask, kv_cache, pos)
        if kv_cache is not None:
            kv_cache.pos = pos + T
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # tied: the logits reuse embed_tokens.weight (no lm_head parameter, so nothing is aliased)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    @property
    def gradient_checkpointing(self):
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value):
        self.model.gradient_checkpointing = value

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, kv_cache=None,
                logits_to_keep=0):
        """Logits (B, T, V) in float32; logits_to_keep=n > 0 keeps only the last n positions."""
        h = self.model(input_ids, inputs_embeds, attention_mask, position_ids, kv_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, head).float()
