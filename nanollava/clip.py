"""CLIP ViT vision tower (Radford et al. 2021), as LLaVA uses it: patch features of a middle layer.

LLaVA-1.5 takes the hidden state of layer -2 of CLIP ViT-L/14-336 (the output of block 23 of
24), drops the CLS token ("default"; "full" keeps it) and feeds the 576 patch vectors to the
projector. Blocks after the selected layer are never run. Parameter names mirror HF's
CLIPVisionModel (`vision_model.embeddings.patch_embedding`, `vision_model.pre_layrnorm`, ...),
so an HF CLIP state dict loads with no renaming.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanollava.kernels import dispatch


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class CLIPVisionEmbeddings(nn.Module):
    """Conv patchify (no bias) -> prepend the class embedding -> add learned positions."""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(C))
        self.patch_embedding = nn.Conv2d(config.num_channels, C, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, C)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, h, w)
        N, C = x.shape[:2]
        if x.shape[2] * x.shape[3] != self.num_patches:         # a wrong image_size in preprocessing
            raise ValueError(f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {x.shape[2]}x{x.shape[3]} "
                             f"patches; the tower expects {self.num_patches} (image_size from its config)")
        x = x.flatten(2).transpose(1, 2)                                      # (N, P, C)
        cls = self.class_embedding.expand(N, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight    # (N, P+1, C)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.n_head = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        N, L, C = x.shape
        q, k, v = (p(x).view(N, L, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = dispatch.attention(q, k, v, causal=False)                         # (N, nh, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(N, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic, HF's key
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # pooled CLS only; unused

    def embed(self, pixel_values):
        """hidden_states[0]: the embeddings after pre_layrnorm, (N, P+1, C)."""
        return self.pre_layrnorm(self.embeddings(pixel_values))


class CLIPVisionTower(nn.Module):
    """The LLaVA vision tower: selected-layer CLIP patch features, (N, 3, H, W) -> (N, P(+1), C)."""
    class_tokens = 1                              # tokens before the patches ("default" drops them)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.gradient_checkpointing = False

    def forward(self, pixel_values, feature_layer=-2, select_strategy="default"):
        """Hidden states at `feature_layer` (HF hidden_states index: 0 = embeddings after pre_layrnorm,
        -1 = last block); a list of layers is concatenated on the channel dim. "default" drops CLS."""
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_states = len(self.vision_model.encoder.layers) + 1
        wanted = {i % n_states for i in layers}
        x = self.vision_model.embed(pixel_values)                             # (N, P+1, C)
        states = {0: x}
        for i, block in enumerate(self.vision_model.encoder.layers[:max(wanted)], start=1):  # later blocks never run
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in wanted:
                states[i] = x
        feats = [states[i % n_states] for i in layers]
        if select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
