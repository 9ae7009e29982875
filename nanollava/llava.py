"""LLaVA (Liu et al. 2023) and LLaVA-1.5 ("Improved Baselines"): CLIP patch features -> projector -> LLM.

The vision tower turns each image into patch features of a middle CLIP layer; the projector
(LLaVA-1.0 `linear`, LLaVA-1.5 `mlp2x_gelu` = Linear -> GELU -> Linear) maps them into the
LLM's embedding space; they overwrite the image placeholder tokens of the prompt (HF
convention: `image_token_id` appears once per visual token) and the LLaMA decoder runs on
the result. Parameter names are exactly the llava-hf Hub layout (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.*`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollava import anyres
from nanollava.clip import CLIPVisionTower
from nanollava.llama import LlamaForCausalLM

IGNORE_INDEX = -100


class MultiModalProjector(nn.Module):
    """`mlp2x_gelu`: linear_1 -> exact (erf) GELU -> linear_2; `linear`: linear_1 only."""

    def __init__(self, in_dim, out_dim, projector_type="mlp2x_gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim) if projector_type == "mlp2x_gelu" else None

    def forward(self, x):
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))


class LLaVA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size * n_layers,
                                                         config.text.hidden_size, config.projector_type)
        self.language_model = LlamaForCausalLM(config.text)
        if config.image_aspect_ratio == "anyres":        # LLaVA-NeXT: learned end-of-row token
            if config.vision_feature_select_strategy != "default":
                raise ValueError("AnyRes needs vision_feature_select_strategy='default' (square feature maps)")
            H = config.text.hidden_size
            self.image_newline = nn.Parameter(torch.randn(H) * H ** -0.5)

    @property
    def gradient_checkpointing(self):
        return self.language_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value):
        """Per-block activation checkpointing in the vision tower and the LLM (training only)."""
        self.vision_tower.gradient_checkpointing = value
        self.language_model.gradient_checkpointing = value

    def project_images(self, pixel_values):
        """(N, 3, H, W) crops -> tower at vision_feature_layer -> select -> projector: (N, n_tokens, H_text)."""
        feats = self.vision_tower(pixel_values, self.config.vision_feature_layer,
                                  self.config.vision_feature_select_strategy)
        return self.multi_modal_projector(feats)

    def encode_images(self, pixel_values, image_sizes=None):
        """Visual tokens per image: a list of (n_tokens_i, H_text). crop/pad: pixel_values (N, 3, H, W);
        anyres: see encode_anyres."""
        if self.config.image_aspect_ratio == "anyres":
            return self.encode_anyres(pixel_values, image_sizes)
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (N, 3, H, W) for crop/pad images, got shape "
                             f"{tuple(pixel_values.shape)} (AnyRes tiles need an anyres config)")
        return list(self.project_images(pixel_values))

    def encode_anyres(self, pixel_values, image_sizes):
        """LLaVA-NeXT AnyRes: pixel_values (N, max_views, 3, H, W) zero-padded past each image's
        1 + gh*gw real views (base view first), image_sizes (N, 2) original (height, width).

        The real views of ALL images go through the tower in one batched call; then each image's
        features are packed (nanollava.anyres.pack_image_features: unpad, newline per row, base
        first). An image_sizes row of (0, 0) (anyres.SQUARE_IMAGE_SIZE) marks a plain crop/pad
        image: only its view 0 is used, giving its base features + one image_newline.
        """
        if pixel_values.dim() != 5 or image_sizes is None:
            raise ValueError("an AnyRes model needs pixel_values (N, views, 3, H, W) and image_sizes (N, 2), "
                             f"got pixel_values {tuple(pixel_values.shape)} and image_sizes "
                             f"{None if image_sizes is None else tuple(image_sizes.shape)}")
        cfg, S = self.config, self.config.vision.image_size
        pinpoints, convention = anyres.config_pinpoints(cfg), cfg.anyres_convention
        sizes = [tuple(s) for s in torch.as_tensor(image_sizes).tolist()]
        if len(sizes) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images in pixel_values but {len(sizes)} image_sizes")
        counts = [anyres.num_tiles(s, pinpoints, S, convention) for s in sizes]
        if max(counts) > pixel_values.shape[1]:
            raise ValueError(f"image_sizes {sizes} need up to {max(counts)} views per image but pixel_values "
                             f"holds {pixel_values.shape[1]}")
        views = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])    # (sum views, 3, H, W)
        feats = self.project_images(views).split(counts)                      # per image (views, n, C)
        out = []
        for f, size in zip(feats, sizes):
            if size == anyres.SQUARE_IMAGE_SIZE:
                out.append(anyres.pack_square_features(f[0], self.image_newline))
            else:
                grid = anyres.grid_shape(size, pinpoints, S, convention)
                out.append(anyres.pack_image_features(f[0], f[1:], size, grid, self.image_newline,
                                                      cfg.anyres_max, convention))
        return out

    def embed(self, input_ids, pixel_values=None, image_sizes=None):
        """Token embeddings (B, T, C) with each image's features written over its placeholder tokens.

        Images fill the placeholders in order of appearance across the batch (row-major).
        """
        is_image = input_ids == self.config.image_token_id                  # (B, T)
        embed_tokens = self.language_model.model.embed_tokens
        x = embed_tokens(input_ids.masked_fill(is_image, 0))                # placeholder id may lie past the vocab
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids has {n_tokens} image tokens but no pixel_values were given")
            return x
        feats = torch.cat(self.encode_images(pixel_values, image_sizes))    # (M, C)
        if n_tokens != feats.shape[0]:
            raise ValueError(f"input_ids has {n_tokens} image tokens but the images give {feats.shape[0]} features "
                             f"({len(pixel_values)} images); each image needs exactly as many image_token_id "
                             f"({self.config.image_token_id}) placeholders as it has visual tokens")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                kv_cache=None, logits_to_keep=0):
        """Logits (B, T, V) float32 (only the last `logits_to_keep` positions when > 0)."""
        x = self.embed(input_ids, pixel_values, image_sizes)
        return self.language_model(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                                   kv_cache=kv_cache, logits_to_keep=logits_to_keep)

    def loss(self, input_ids, labels, pixel_values=None, image_sizes=None, attention_mask=None):
        """Next-token cross-entropy, mean over supervised tokens (labels != -100); 0 when there are none."""
        logits = self(input_ids, pixel_values, image_sizes, attention_mask)          # (B, T, V)
        # shift the labels, not the logits: position t predicts token t+1 (no (B, T-1, V) copy)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)                   # (B, T)
        n = (targets != IGNORE_INDEX).sum()
        total = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / n.clamp(min=1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", vision_tower=None):
        """Load a llava-hf, original LLaVA or nanollava directory (see nanollava.checkpoint)."""
        from nanollava.checkpoint import load_llava
        return load_llava(path, dtype=dtype, device=device, vision_tower=vision_tower)

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in the llava-hf layout (transformers loads it)."""
        from nanollava.checkpoint import save_llava
        return save_llava(self, out_dir)
