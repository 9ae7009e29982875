"""LLaVA (Liu et al. 2023), LLaVA-1.5 ("Improved Baselines") and LLaVA-NeXT: vision tower -> projector -> LLM.

An image (or, with AnyRes, its base view and tiles) goes through the CLIP tower; the patch features
of a middle layer go through the projector (LLaVA-1.0 `linear`, LLaVA-1.5 `mlp2x_gelu` = Linear ->
GELU -> Linear) into the LLM's embedding space; AnyRes images are then packed (nanollava/anyres.py).
The prompt holds the image placeholder id once per visual token (HF convention), so the visual
tokens simply overwrite those positions and the LLaMA decoder runs on the result.
`num_image_tokens` says how many tokens an image becomes, from the same geometry.

Parameter names are the llava-hf Hub layout (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.*`,
`image_newline`). Loading and saving checkpoints is nanollava/checkpoint.py's job, which binds
`LLaVA.from_pretrained` and `LLaVA.save_pretrained` (see nanollava/__init__.py).
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


PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
VISION_TOWERS = {"clip_vision_model": CLIPVisionTower}        # VisionConfig.model_type -> tower


def pinpoints(config):
    """The AnyRes canvases, [height, width] (LLaVA-1.6's when the config names none)."""
    return config.image_grid_pinpoints or anyres.DEFAULT_PINPOINTS


def num_image_tokens(config, image_size):
    """Visual tokens an image of image_size (h, w) becomes: exactly what LLaVA.encode_images emits.

    crop/pad: one (image_size / patch_size)^2 feature map (+1 for the CLS with "full");
    anyres: base view + unpadded tile grid + one newline per row (anyres.num_tokens).
    """
    tile, side = config.vision.image_size, config.vision.image_size // config.vision.patch_size
    if config.image_aspect_ratio == "anyres":
        return anyres.num_tokens(image_size, pinpoints(config), tile, side, config.anyres_max)
    return side * side + (config.vision_feature_select_strategy == "full")


class LLaVA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.vision_tower = VISION_TOWERS[config.vision.model_type](config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size * n_layers,
                                                         config.text.hidden_size, config.projector_type)
        self.language_model = LlamaForCausalLM(config.text)
        if config.image_aspect_ratio == "anyres":        # LLaVA-NeXT: a learned end-of-row token
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
            self.reset_parameters()

    def reset_parameters(self):
        """image_newline as LLaVA-NeXT initialises it: randn(H) / sqrt(H)."""
        if hasattr(self, "image_newline"):
            with torch.no_grad():
                self.image_newline.normal_(0.0, self.image_newline.numel() ** -0.5)

    @property
    def gradient_checkpointing(self):
        return self.language_model.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value):
        """Per-block activation checkpointing in the vision tower and the LLM (training only)."""
        self.vision_tower.gradient_checkpointing = self.language_model.model.gradient_checkpointing = value

    def project_images(self, pixel_values):
        """(N, 3, S, S) views -> tower at vision_feature_layer -> projector: (N, n, C_text)."""
        feats = self.vision_tower(pixel_values, self.config.vision_feature_layer,
                                  self.config.vision_feature_select_strategy)
        return self.multi_modal_projector(feats)

    def encode_images(self, pixel_values, image_sizes=None):
        """Visual tokens per image: a list of (num_image_tokens(config, size), C_text) tensors.

        crop/pad: pixel_values (N, 3, S, S). anyres: pixel_values (N, max views, 3, S, S), zero-padded
        past each image's 1 + gh*gw real views (base first), and image_sizes (N, 2) original (h, w),
        a row of (0, 0) marking a square image (its base view + one newline). The real views of all
        images go through the tower in one batch, then each image is packed.
        """
        if self.config.image_aspect_ratio != "anyres":
            return list(self.project_images(pixel_values))
        tile = self.config.vision.image_size
        sizes = [tuple(s) for s in torch.as_tensor(image_sizes).tolist()]
        grids = [None if s == anyres.SQUARE_IMAGE_SIZE else anyres.grid_shape(s, pinpoints(self.config), tile)
                 for s in sizes]
        counts = [1 if g is None else 1 + g[0] * g[1] for g in grids]
        views = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])   # (sum of views, 3, S, S)
        feats = self.project_images(views).split(counts)                     # per image (views, n, C)
        newline = self.image_newline
        return [torch.cat((f[0], newline[None].to(f.dtype))) if grid is None
                else anyres.pack_image_features(f[0], f[1:], size, grid, newline, self.config.anyres_max)
                for f, size, grid in zip(feats, sizes, grids)]

    def embed(self, input_ids, pixel_values=None, image_sizes=None):
        """Token embeddings (B, T, C) with the images' visual tokens written over their placeholders,
        in order of appearance across the batch (row-major)."""
        is_image = input_ids == self.config.image_token_id                  # (B, T)
        x = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))  # the id may lie past the vocab
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids has {n_tokens} image tokens but no pixel_values were given")
            return x
        feats = torch.cat(self.encode_images(pixel_values, image_sizes))    # (M, C)
        if n_tokens != feats.shape[0]:
            raise ValueError(f"input_ids has {n_tokens} image tokens but the images give {feats.shape[0]} features "
                             f"({len(pixel_values)} images); each image needs num_image_tokens(config, size) "
                             f"placeholders (id {self.config.image_token_id})")
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
