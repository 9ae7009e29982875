"""AnyRes (LLaVA-NeXT, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024): the geometry
of a high-resolution image and the packing of its features into tokens.

The 336 px tower sees a large image as
  1. a *base* view: the whole picture squashed to 336 x 336 (global context), and
  2. *tiles*: the picture resized to fit the best "grid pinpoint" canvas (e.g. 672 x 672), centred
     on black, cut into 336 x 336 crops read row-major (the pixels: nanollava/image.py).
Each view gives a 24 x 24 feature map. The tile maps are stitched into one (gh*24, gw*24) grid,
the rows/columns that only saw padding are removed (`unpad`), with `anyres_max_N` (LLaVA-NeXT-
Interleave / OneVision) a grid holding more than ~N tiles' worth is bilinearly shrunk, a learned
`image_newline` closes every row, and the base features go first (`pack_image_features`).

Everything but the packing is pure integer geometry on (height, width) pairs, so `num_tokens`
knows an image's token count before the tower runs, from the same functions the packing uses.
Pinpoints are [height, width] (transformers' reading; the loader converts the original code's
[width, height] lists). docs/anyres.md has the worked example and where the original code differs.
"""
import math

import torch
import torch.nn.functional as F

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]   # LLaVA-v1.6


def default_pinpoints(tile):
    """LLaVA-v1.6's grids (1x2, 2x1, 2x2, 3x1, 1x3) in tiles of `tile` pixels (DEFAULT_PINPOINTS for 336)."""
    return [[a * tile // 336, b * tile // 336] for a, b in DEFAULT_PINPOINTS]
# An image_sizes row of (0, 0) marks a plain square ("pad"/"crop") image inside an AnyRes batch: its
# base view only, then one image_newline (LLaVA-NeXT's single-view branch, used for multi-image samples).
SQUARE_IMAGE_SIZE = (0, 0)


def select_best_resolution(size, pinpoints):
    """LLaVA-NeXT `select_best_resolution`: the canvas (height, width) for an image of `size` (h, w).

    For each candidate, scale the image to fit; effective = min(pixels kept, original pixels),
    wasted = canvas area - effective. Keep the largest effective resolution, ties broken by the
    smaller waste, the first candidate winning exact ties (so the pinpoint order matters).
    """
    original_height, original_width = size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)   # the same float ops as the references
        effective = min(int(original_width * scale) * int(original_height * scale), original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best_fit, max_effective, min_wasted = (height, width), effective, wasted
    return best_fit


def grid_shape(size, pinpoints, tile):
    """(rows, cols) of tiles for an image of `size` (h, w) (`get_anyres_image_grid_shape`)."""
    height, width = select_best_resolution(size, pinpoints)
    return height // tile, width // tile


def unpad_shape(grid_size, size):
    """(h, w) of a (H, W) feature grid after `unpad_image` for an image of `size` (h, w): the side
    that was padded keeps round(other side's scale * original), minus an odd leftover row, in exact
    integer arithmetic (= transformers' int(round(x, 7)); the original's int(x) is 2 rows short
    when x lands a hair under an integer, see docs/anyres.md)."""
    (H, W), (h, w) = grid_size, size
    if w * H > W * h:                           # wider than the grid: padding was added above and below
        return H - 2 * ((H - h * W // w) // 2), W
    return H, W - 2 * ((W - w * H // h) // 2)


def anyres_max_shape(height, width, anyres_max, side):
    """anyres_max_N: (h, w) of the unpadded grid after the bilinear shrink, which happens only when
    t = sqrt(h*w / (N * side^2)) > 1.1, to (int(h // t), int(w // t))."""
    if anyres_max is None:
        return height, width
    times = math.sqrt(height * width / (anyres_max * side ** 2))
    if times > 1.1:
        return int(height // times), int(width // times)
    return height, width


def num_tokens(size, pinpoints, tile, side, anyres_max=None):
    """Visual tokens of one AnyRes image of `size` (h, w): side^2 base tokens + h' * (w' + 1) grid
    tokens (h', w' the unpadded, maybe shrunk grid; +1 the newline). Equals len(pack_image_features)."""
    if tuple(size) == SQUARE_IMAGE_SIZE:
        return side * side + 1
    gh, gw = grid_shape(size, pinpoints, tile)
    height, width = anyres_max_shape(*unpad_shape((gh * side, gw * side), size), anyres_max, side)
    return side * side + height * (width + 1)


def pack_image_features(base, tiles, size, grid, image_newline, anyres_max=None):
    """LLaVA-NeXT `spatial_unpad` packing of one image: base (n, C), tiles (gh*gw, n, C) with n = side^2,
    size the original (h, w), grid (gh, gw), image_newline (C,) -> (n + h' * (w' + 1), C)."""
    n, channels = base.shape
    side, (gh, gw) = math.isqrt(n), grid
    x = tiles.view(gh, gw, side, side, channels).permute(4, 0, 2, 1, 3)    # (C, gh, side, gw, side)
    x = x.reshape(channels, gh * side, gw * side)                          # (C, H, W) stitched grid
    h, w = unpad_shape(x.shape[1:], size)
    top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
    x = x[:, top:top + h, left:left + w]                                   # (C, h, w) unpadded
    new_h, new_w = anyres_max_shape(h, w, anyres_max, side)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear")[0]
    newline = image_newline.to(x.dtype)[:, None, None].expand(channels, new_h, 1)
    x = torch.cat((x, newline), dim=-1).flatten(1, 2).transpose(0, 1)      # (h' * (w' + 1), C)
    return torch.cat((base, x.to(base.dtype)), dim=0)
