"""LLaVA (Liu et al. 2023), LLaVA-1.5 ("Improved Baselines"), LLaVA-NeXT and LLaVA-OneVision:
vision tower -> projector -> LLM.

An image (or, with AnyRes, its base view and tiles) goes through the vision tower (CLIP or SigLIP);
the patch features of a chosen layer go through the projector (LLaVA-1.0 `linear`, LLaVA-1.5
`mlp2x_gelu` = Linear -> GELU -> Linear) into the LLM's embedding space, optionally 2x2-pooled
before or after it (the LLaVA-NeXT ablations' "Pooling"); AnyRes images are then packed
(nanollava/anyres.py). A OneVision video's frames are projected, 2x2-pooled and closed by one
image_newline. The prompt holds the image (or video) placeholder id once per visual token (HF
convention), so the visual tokens simply overwrite those positions and the decoder runs on the
result. `num_image_tokens` and `num_video_tokens` say how many tokens an input becomes.

Parameter names are the llava-hf Hub layout (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.*`,
`image_newline`). Loading and saving checkpoints is nanollava/checkpoint.py's job, which binds
`LLaVA.from_pretrained` and `LLaVA.save_pretrained` (see nanollava/__init__.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollava import anyres
from nanollava.clip import CLIPVisionTower
from nanollava.llama import LlamaForCausalLM
from nanollava.siglip import SiglipVisionTower

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
VISION_TOWERS = {"clip_vision_model": CLIPVisionTower, "siglip_vision_model": SiglipVisionTower}  # by model_type


def pinpoints(config):
    """The AnyRes canvases, [height, width] (LLaVA-1.6's grids when the config names none)."""
    return config.image_grid_pinpoints or anyres.default_pinpoints(config.vision.image_size)


def pool2x2(x):
    """Bilinear 2x2 pooling of square feature maps, (N, side^2, C) -> (N, ceil(side / 2)^2, C)
    (LLaVA-OneVision's `apply_pooling`)."""
    N, n, C = x.shape
    side = math.isqrt(n)
    x = F.interpolate(x.view(N, side, side, C).permute(0, 3, 1, 2), size=(math.ceil(side / 2),) * 2,
                      mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(N, -1, C)


def num_image_tokens(config, image_size):
    """Visual tokens an image of image_size (h, w) becomes: exactly what LLaVA.encode_images emits.

    crop/pad/squash: one view's features, (image_size / patch_size)^2 patches (+1 for CLIP's CLS with
    "full"; ceil(side / 2)^2 with image_pooling); anyres: base view + unpadded tile grid + one newline
    per row (anyres.num_tokens).
    """
    tile, side = config.vision.image_size, config.vision.image_size // config.vision.patch_size
    side = math.ceil(side / 2) if config.image_pooling else side
    if config.image_aspect_ratio == "anyres":
        return anyres.num_tokens(image_size, pinpoints(config), tile, side, config.anyres_max)
    class_tokens = VISION_TOWERS[config.vision.model_type].class_tokens
    return side * side + class_tokens - (config.vision_feature_select_strategy == "default")


def num_video_tokens(config, frames):
    """Visual tokens a OneVision video of `frames` frames becomes: each frame's 2x2-pooled map, then one
    image_newline (what LLaVA.encode_videos emits)."""
    return frames * math.ceil(config.vision.image_size // config.vision.patch_size / 2) ** 2 + 1


class LLaVA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.vision_tower = VISION_TOWERS[config.vision.model_type](config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size * n_layers,
                                                         config.text.hidden_size, config.projector_type)
        self.language_model = LlamaForCausalLM(config.text)
        if config.image_aspect_ratio == "anyres" or config.video_token_id is not None:   # NeXT: end-of-row token
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

    def project_images(self, pixel_values, pooling=None):
        """(N, 3, S, S) views -> tower at vision_feature_layer -> projector: (N, n, C_text), with
        `pooling` (default: config.image_pooling) 2x2 before or after the projector."""
        pooling = pooling or self.config.image_pooling
        feats = self.vision_tower(pixel_values, self.config.vision_feature_layer,
                                  self.config.vision_feature_select_strategy)
        x = self.multi_modal_projector(pool2x2(feats) if pooling == "before_projector" else feats)
        return pool2x2(x) if pooling == "after_projector" else x

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

    def encode_videos(self, pixel_values_videos):
        """LLaVA-OneVision videos (V, F, 3, S, S) -> per video (num_video_tokens(config, F), C_text): every
        frame projected and 2x2-pooled, the frames in order, then one image_newline."""
        V, frames = pixel_values_videos.shape[:2]
        x = self.project_images(pixel_values_videos.flatten(0, 1), pooling="after_projector")
        x = x.reshape(V, -1, x.shape[-1])                                     # (V, F * pooled, C)
        return [torch.cat((v, self.image_newline[None].to(v.dtype))) for v in x]

    def embed(self, input_ids, pixel_values=None, image_sizes=None, pixel_values_videos=None):
        """Token embeddings (B, T, C) with the visual tokens of the images (and videos) written over their
        placeholders, in order of appearance across the batch (row-major)."""
        is_image = input_ids == self.config.image_token_id                                 # (B, T)
        is_video = input_ids == (-1 if self.config.video_token_id is None else self.config.video_token_id)
        x = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image | is_video, 0))  # ids past the vocab
        if self.training and pixel_values is None and pixel_values_videos is None:
            x = x + self.zero_image_term(x.device)
        x = self._fill(x, is_image, pixel_values, lambda: self.encode_images(pixel_values, image_sizes), "image")
        return self._fill(x, is_video, pixel_values_videos, lambda: self.encode_videos(pixel_values_videos), "video")

    def zero_image_term(self, device):
        """0 x (tower + projector on one zero image, and image_newline): a training batch without
        images still runs them, as the original LLaVA feeds text-only samples a zero image. With
        FSDP every rank then runs the same units and collectives whatever its batch holds, and
        the vision weights get a (zero) gradient in the same order (docs/gpu.md)."""
        S = self.config.vision.image_size
        term = 0 * self.project_images(torch.zeros(1, 3, S, S, device=device)).sum()
        return term + 0 * self.image_newline.sum() if hasattr(self, "image_newline") else term

    def _fill(self, x, where, pixels, encode, what):
        n_tokens = int(where.sum())
        if pixels is None:
            if n_tokens:
                raise ValueError(f"input_ids has {n_tokens} {what} tokens but no pixel values were given")
            return x
        feats = torch.cat(encode())                                          # (M, C)
        if n_tokens != feats.shape[0]:
            raise ValueError(f"input_ids has {n_tokens} {what} tokens but the {len(pixels)} {what}s give "
                             f"{feats.shape[0]} features; each needs num_{what}_tokens(config, ...) placeholders")
        return x.masked_scatter(where[..., None], feats.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                kv_cache=None, logits_to_keep=0, pixel_values_videos=None):
        """Logits (B, T, V) float32 (only the last `logits_to_keep` positions when > 0)."""
        x = self.embed(input_ids, pixel_values, image_sizes, pixel_values_videos)
        return self.language_model(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                                   kv_cache=kv_cache, logits_to_keep=logits_to_keep)

    def loss(self, input_ids, labels, pixel_values=None, image_sizes=None, attention_mask=None, reduction="mean"):
        """Next-token cross-entropy over the supervised tokens (labels != -100): their mean (0 when
        there are none), or with reduction="sum" their sum (train.py divides a global batch's sum by
        its count of supervised_tokens)."""
        logits = self(input_ids, pixel_values, image_sizes, attention_mask)          # (B, T, V)
        # shift the labels, not the logits: position t predicts token t+1 (no (B, T-1, V) copy)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)                   # (B, T)
        total = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total if reduction == "sum" else total / supervised_tokens(labels).clamp(min=1)


def supervised_tokens(labels):
    """How many next-token predictions of (B, T) labels LLaVA.loss counts (labels shifted by one)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
