"""AnyRes (LLaVA-NeXT, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024).

A high-resolution image is seen by the 336 px CLIP tower as
  1. a *base* image: the whole picture squashed to 336 x 336 (global context), and
  2. *tiles*: the picture resized to fit the best "grid pinpoint" resolution (e.g. 672 x 672),
     centred on a black canvas, and cut into 336 x 336 crops read row-major.
Each crop gives a 24 x 24 feature map. The tile maps are stitched back into one (gh*24, gw*24)
grid, the rows/columns that only saw the black padding are removed (`unpad_image`), a learned
`image_newline` vector closes every row, and the base features go first. With `anyres_max_N`
(LLaVA-NeXT-Interleave / OneVision) the unpadded grid is bilinearly shrunk when it holds more
than ~N tiles' worth of features.

Everything here is pure geometry (plus one PIL resize and one tensor reshape), so the token count
of an image is known before the vision tower runs: `num_image_tokens(size, config)` must equal
`len(pack_image_features(...))`, which the tests check against HF transformers.

Two conventions exist and differ in two details (see docs/anyres.md):
  * "hf" (transformers LlavaNext, default): a pinpoint [a, b] is (height, width); unpad rounds the
    rescaled side with int(round(x, 7)).
  * "original" (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT): a pinpoint [a, b] is (width, height);
    unpad truncates with int(x).
All sizes in this module's API are (height, width) whatever the convention. The functions take
pinpoints in the convention's own reading order; LLaVAConfig.image_grid_pinpoints is always the
HF [h, w] list (an original checkpoint's list is converted on load with `original_pinpoints_to_hf`),
so that `save_pretrained` writes a config transformers reads the same way.
"""

import math
import re

import torch
import torch.nn.functional as F
from PIL import Image

CONVENTIONS = ("hf", "original")
# LLaVA-v1.6 pinpoints, also transformers' LlavaNextConfig default.
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# An image_sizes row of (0, 0) marks a plain square ("pad"/"crop") image inside an AnyRes batch:
# only its base view is encoded, followed by one image_newline (LLaVA-NeXT's single-image path).
SQUARE_IMAGE_SIZE = (0, 0)


def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"anyres convention must be one of {CONVENTIONS}, got {convention!r}")


def parse_pinpoints(pinpoints, image_size=336):
    """Grid pinpoints as a list of [a, b] pairs, in the order they are stored.

    Accepts a list of pairs (config.json `image_grid_pinpoints`), its string form
    "[[336, 672], ...]", or the generated-grid form "(1x1),...,(6x6)" of LLaVA-OneVision, which
    expands to every (i, j) from the first to the last cell, each cell `image_size` pixels:
    "(1x1),...,(2x2)" -> [[s, s], [s, 2s], [2s, s], [2s, 2s]] with s = image_size.
    Which element is the height depends on the convention (see `candidate_resolutions`).
    """
    if isinstance(pinpoints, str):
        cells = re.findall(r"\((\d+)\s*x\s*(\d+)\)", pinpoints)
        if cells:
            (i0, j0), (i1, j1) = map(int, cells[0]), map(int, cells[-1])
            pinpoints = [[i * image_size, j * image_size]
                         for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
        else:
            pinpoints = [[int(a), int(b)] for a, b in re.findall(r"\[\s*(\d+)\s*,\s*(\d+)\s*\]", pinpoints)]
    pairs = [[int(a), int(b)] for a, b in pinpoints]
    if not pairs:
        raise ValueError(f"image_grid_pinpoints is empty or unreadable: {pinpoints!r}")
    for a, b in pairs:
        if a <= 0 or b <= 0 or a % image_size or b % image_size:
            raise ValueError(f"grid pinpoint {[a, b]} must be a positive multiple of the tile size {image_size}")
    return pairs


def original_pinpoints_to_hf(pinpoints, image_size=336):
    """An original-code `image_grid_pinpoints` (list of (w, h), or "(1x1),...,(6x6)") as the
    equivalent HF list of [h, w] in the same order (same choices, same tie-breaking)."""
    return [[b, a] for a, b in parse_pinpoints(pinpoints, image_size)]


def config_pinpoints(config):
    """config.image_grid_pinpoints ([h, w], HF) in the reading order of config.anyres_convention."""
    pinpoints = parse_pinpoints(config.image_grid_pinpoints or DEFAULT_PINPOINTS, config.vision.image_size)
    return pinpoints if config.anyres_convention == "hf" else [[b, a] for a, b in pinpoints]


def candidate_resolutions(pinpoints, convention="hf"):
    """The pinpoints as (height, width) pairs under `convention` ("original" reads [w, h])."""
    _check_convention(convention)
    return [(a, b) if convention == "hf" else (b, a) for a, b in pinpoints]


def select_best_resolution(size, pinpoints, convention="hf"):
    """LLaVA-NeXT `select_best_resolution`: the canvas (height, width) for an image of `size` (h, w).

    For each candidate, scale the image to fit; effective = min(pixels kept, original pixels),
    wasted = canvas area - effective. Keep the largest effective resolution, ties broken by the
    smaller waste, the first candidate winning exact ties (so the pinpoint order matters).
    """
    original_height, original_width = size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in candidate_resolutions(pinpoints, convention):
        scale = min(width / original_width, height / original_height)  # same float ops as both references
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best_fit, max_effective, min_wasted = (height, width), effective, wasted
    if best_fit is None:
        raise ValueError(f"no grid pinpoint fits an image of size (h, w) = {tuple(size)}")
    return best_fit


def fit_size(size, target):
    """(new_h, new_w) of `size` scaled to fit inside `target` (h, w): one side fills, the other is
    ceil()-ed and clamped (HF `get_patch_output_size`, original `resize_and_pad_image`)."""
    original_height, original_width = size
    target_height, target_width = target
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def resize_and_pad(img, target):
    """Resize a PIL image to fit `target` (h, w) keeping its aspect ratio (bicubic) and paste it
    centred on a black canvas of exactly `target`."""
    target_height, target_width = target
    new_height, new_width = fit_size((img.height, img.width), target)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    img = img if img.mode == "RGB" else img.convert("RGB")
    resized = img.resize((new_width, new_height), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def tiles(img, pinpoint, patch=336):
    """The 1 + gh*gw views of an AnyRes image, as PIL images of patch x patch pixels:
    the base image (whole picture squashed to patch x patch, not padded), then the row-major
    crops of the image resized and padded onto the `pinpoint` (h, w) canvas."""
    img = img if img.mode == "RGB" else img.convert("RGB")   # image.process composites alpha first
    canvas = resize_and_pad(img, pinpoint)
    crops = [canvas.crop((x, y, x + patch, y + patch))
             for y in range(0, pinpoint[0], patch) for x in range(0, pinpoint[1], patch)]
    return [img.resize((patch, patch), Image.Resampling.BICUBIC)] + crops


def grid_shape(size, pinpoints, image_size=336, convention="hf"):
    """(gh, gw): rows and columns of tiles for an image of `size` (h, w)
    (HF/original `get_anyres_image_grid_shape`, always returned here as (rows, cols))."""
    height, width = select_best_resolution(size, pinpoints, convention)
    return height // image_size, width // image_size


def num_tiles(size, pinpoints, image_size=336, convention="hf"):
    """Views the vision tower encodes for one image: 1 base + gh * gw tiles
    (1 for a SQUARE_IMAGE_SIZE image)."""
    if tuple(size) == SQUARE_IMAGE_SIZE:
        return 1
    gh, gw = grid_shape(size, pinpoints, image_size, convention)
    return 1 + gh * gw


def _unpad_padding(current_size, original_size, convention):
    """(rows, cols) removed on EACH side by unpad_image."""
    _check_convention(convention)
    current_height, current_width = current_size
    original_height, original_width = original_size
    if original_width / original_height > current_width / current_height:  # padding was added to the height
        new_height = original_height * (current_width / original_width)
        new_height = int(round(new_height, 7)) if convention == "hf" else int(new_height)
        return (current_height - new_height) // 2, 0
    new_width = original_width * (current_height / original_height)  # padding was added to the width
    new_width = int(round(new_width, 7)) if convention == "hf" else int(new_width)
    return 0, (current_width - new_width) // 2


def unpad_shape(current_size, original_size, convention="hf"):
    """(h, w) left of a (current_h, current_w) feature grid after `unpad_image`."""
    pad_rows, pad_cols = _unpad_padding(current_size, original_size, convention)
    return current_size[0] - 2 * pad_rows, current_size[1] - 2 * pad_cols


def unpad_image(tensor, original_size, convention="hf"):
    """Drop the feature rows or columns of a (C, H, W) grid that only saw the black padding of
    `resize_and_pad` for an image of `original_size` (h, w) (LLaVA-NeXT `unpad_image`)."""
    current_height, current_width = tensor.shape[1:]
    pad_rows, pad_cols = _unpad_padding((current_height, current_width), original_size, convention)
    return tensor[:, pad_rows:current_height - pad_rows, pad_cols:current_width - pad_cols]


def anyres_max_shape(height, width, anyres_max, side=24):
    """anyres_max_N: (h, w) of the unpadded grid after the bilinear shrink. Shrinks only when
    t = sqrt(h*w / (N * side^2)) > 1.1, to (int(h // t), int(w // t))."""
    if anyres_max is None:
        return height, width
    times = math.sqrt(height * width / (anyres_max * side ** 2))
    if times > 1.1:
        return int(height // times), int(width // times)
    return height, width


def pack_image_features(base_features, tile_features, image_size, grid, image_newline,
                        anyres_max=None, convention="hf"):
    """LLaVA-NeXT `spatial_unpad` packing of one image's features into its token sequence.

    base_features (n, C), tile_features (gh*gw, n, C) with n = side^2 (24^2 for CLIP-L/336),
    image_size the original (h, w), grid (gh, gw), image_newline (C,).
    Returns (n + h' * (w' + 1), C): base features, then the unpadded (and, with anyres_max,
    shrunk) (h', w') grid row-major with an image_newline after every row.
    """
    n, channels = base_features.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"AnyRes needs a square feature map per tile, got {n} features "
                         "(vision_feature_select_strategy must be 'default')")
    gh, gw = grid
    if tile_features.shape[0] != gh * gw:
        raise ValueError(f"expected {gh}x{gw}={gh * gw} tiles for image size {tuple(image_size)}, "
                         f"got {tile_features.shape[0]}")
    grid_features = tile_features.view(gh, gw, side, side, channels)      # (gh, gw, side, side, C)
    grid_features = grid_features.permute(4, 0, 2, 1, 3).reshape(channels, gh * side, gw * side)  # (C, H, W)
    grid_features = unpad_image(grid_features, image_size, convention)     # (C, h, w)
    height, width = grid_features.shape[1:]
    new_height, new_width = anyres_max_shape(height, width, anyres_max, side)
    if (new_height, new_width) != (height, width):
        grid_features = F.interpolate(grid_features[None], size=(new_height, new_width), mode="bilinear")[0]
    newline = image_newline.to(grid_features.dtype)[:, None, None].expand(channels, new_height, 1)
    grid_features = torch.cat((grid_features, newline), dim=-1)            # (C, h, w + 1)
    grid_features = grid_features.flatten(1, 2).transpose(0, 1)            # (h * (w + 1), C)
    return torch.cat((base_features, grid_features.to(base_features.dtype)), dim=0)


def pack_square_features(base_features, image_newline):
    """A SQUARE_IMAGE_SIZE image in an AnyRes model: its n base features and one image_newline
    (the single-image branch of LLaVA-NeXT's spatial_unpad merge)."""
    return torch.cat((base_features, image_newline.to(base_features.dtype)[None]), dim=0)


def token_count(size, pinpoints, image_size=336, patch_size=14, convention="hf", anyres_max=None):
    """Number of visual tokens an image of `size` (h, w) becomes, computed without the model:
    side^2 base tokens + h' * (w' + 1) grid tokens (side = image_size // patch_size)."""
    side = image_size // patch_size
    if tuple(size) == SQUARE_IMAGE_SIZE:
        return side * side + 1
    if min(size) <= 0:
        raise ValueError(f"image size must be positive (h, w), got {tuple(size)}")
    gh, gw = grid_shape(size, pinpoints, image_size, convention)
    height, width = unpad_shape((gh * side, gw * side), size, convention)
    height, width = anyres_max_shape(height, width, anyres_max, side)
    return side * side + height * (width + 1)


def num_image_tokens(size, config):
    """`token_count` for a LLaVAConfig with image_aspect_ratio == "anyres"."""
    if config.vision_feature_select_strategy != "default":
        raise ValueError("AnyRes supports vision_feature_select_strategy='default' only (square feature maps)")
    return token_count(size, config_pinpoints(config), config.vision.image_size, config.vision.patch_size,
                       config.anyres_convention, config.anyres_max)


def pad_views(pixels):
    """Stack AnyRes images of different view counts: list of (views_i, 3, H, W) (or already
    batched (n, views, 3, H, W)) -> (N, max views, 3, H, W), zero-padded like HF's processor;
    the model reads each image's real count from its image_sizes row."""
    pixels = [p for x in pixels for p in (x if x.dim() == 5 else [x])]
    views = max(p.shape[0] for p in pixels)
    return torch.stack([torch.cat([p, p.new_zeros(views - p.shape[0], *p.shape[1:])]) for p in pixels])
