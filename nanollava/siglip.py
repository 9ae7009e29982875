"""SigLIP ViT vision tower (Zhai et al. 2023): the encoder the LLaVA-NeXT ablations pick (SO400M/14 at
384 px) and LLaVA-OneVision / -Interleave run.

CLIP's pre-LN blocks (nanollava/clip.py) with three differences: no class token (384 / 14 = 27, so
27 x 27 = 729 patch tokens), a patch embedding with a bias and no pre-LayerNorm, and the tanh GELU
(`gelu_pytorch_tanh`). `post_layernorm`, like transformers' attention-pooling head, only makes the
pooled output, which LLaVA never uses. The original LLaVA-NeXT deletes the last of SO400M's 27
blocks and takes the output of the 26th; transformers' LLaVA configs say the same with a 26-block
tower and vision_feature_layer -1. Parameter names mirror HF's SiglipVisionModel.
"""
import torch.nn as nn

from nanollava.clip import CLIPEncoder, CLIPVisionTower


class SiglipVisionEmbeddings(nn.Module):
    """Conv patchify (with bias) -> add learned positions; no class token."""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(config.num_channels, C, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(self.num_patches, C)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, h, w)
        if x.shape[2] * x.shape[3] != self.num_patches:         # a wrong image_size in preprocessing
            raise ValueError(f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {x.shape[2]}x{x.shape[3]} "
                             f"patches; the tower expects {self.num_patches} (image_size from its config)")
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight   # (N, P, C)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # pooled output only

    def embed(self, pixel_values):
        """hidden_states[0]: the patch embeddings, (N, P, C)."""
        return self.embeddings(pixel_values)


class SiglipVisionTower(CLIPVisionTower):
    """The LLaVA vision tower on SigLIP: selected-layer patch features, (N, 3, H, W) -> (N, P, C).
    (transformers' "default" strategy drops the first token even here; LLaVA's SigLIP configs say "full")."""
    class_tokens = 0

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)
        self.gradient_checkpointing = False
