"""Image preprocessing for the vision tower (CLIP paper; LLaVA-1.5 paper §3 "pad"; LLaVA-NeXT AnyRes).

  crop    resize the shortest edge to image_size (PIL bicubic) + center crop (CLIPImageProcessor)
  pad     paste centered on a square of side max(w, h) filled with the mean colour (122, 116, 104
          for CLIP), then crop (original LLaVA `expand2square`, image_aspect_ratio="pad")
  squash  resize to image_size x image_size, aspect ratio not kept (SiglipImageProcessor)
  anyres  LLaVA-NeXT: a base view squashed to image_size, then the image_size tiles of the image
          fitted onto the best grid pinpoint canvas (geometry in nanollava/anyres.py)

then x / 255, normalise with the tower's mean / std (CLIP's, or SigLIP's 0.5). Matches
transformers' CLIPImageProcessor, SiglipImageProcessor and LlavaNextImageProcessor (PIL backend) to
float rounding, including their RGB conversion (alpha composited onto white) and resize-size
rounding (long edge = int(size * long / short)).
"""
import math

import torch
from PIL import Image

from nanollava import anyres
from nanollava.config import CLIP_MEAN, CLIP_STD, LLaVAConfig
from nanollava.llava import num_image_tokens as _num_image_tokens
from nanollava.llava import pinpoints as _pinpoints

MODES = ("crop", "pad", "squash", "anyres")


def to_rgb(img):
    """RGB like HF `convert_to_rgb`: any image with alpha (RGBA, LA, P with transparency) is
    composited onto white; everything else (L, P, CMYK, ...) goes through PIL's convert."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def expand2square(img, background):
    """Original LLaVA `expand2square`: paste centered on a max(w, h) square of `background`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def resize_shortest_edge_and_crop(img, size, resample=Image.Resampling.BICUBIC):
    """CLIP resize (shortest edge -> size, long edge int(size * long / short)) + center crop size."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return img.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))


def resize_and_pad(img, target):
    """AnyRes: resize to fit `target` (h, w) keeping the aspect ratio (bicubic; one side fills, the
    other is ceil()-ed and clamped, as HF and the original do) and paste centred on black."""
    (height, width), (target_height, target_width) = (img.height, img.width), target
    scale_w, scale_h = target_width / width, target_height / height             # HF's float ops, exactly
    if scale_w < scale_h:
        new_height, new_width = min(math.ceil(height * scale_w), target_height), target_width
    else:
        new_height, new_width = target_height, min(math.ceil(width * scale_h), target_width)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    resized = img.resize((new_width, new_height), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def tiles(img, canvas, tile):
    """The 1 + gh*gw views of an AnyRes image: the base view (the whole picture squashed to tile x
    tile, not padded), then the row-major tile crops of the image fitted onto `canvas` (h, w)."""
    padded = resize_and_pad(img, canvas)
    crops = [padded.crop((x, y, x + tile, y + tile))
             for y in range(0, canvas[0], tile) for x in range(0, canvas[1], tile)]
    return [img.resize((tile, tile), Image.Resampling.BICUBIC)] + crops


def normalize(img, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 RGB PIL image -> (3, H, W) float32 ((x / 255) - mean) / std."""
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)          # one copy out of PIL
    x = x.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()     # (3, H, W) uint8: cheap
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return x.to(torch.float32).mul_(scale).sub_(shift)                        # (x / 255 - mean) / std


def process(img, mode=None, image_size=336, mean=CLIP_MEAN, std=CLIP_STD, pinpoints=None, config=None):
    """PIL image -> (pixels (3, image_size, image_size) float32, original size (height, width)).

    mode="anyres": pixels are (1 + gh*gw, 3, image_size, image_size), base view first, over
    `pinpoints` ([height, width] canvases; default LLaVA-v1.6's). A LLaVAConfig `config` supplies the
    mode (unless given), image_size, mean, std and pinpoints.
    """
    if config is not None:
        mode, image_size, pinpoints = mode or config.image_aspect_ratio, config.vision.image_size, _pinpoints(config)
        mean, std = config.image_mean, config.image_std
    mode = mode or "pad"
    if mode not in MODES:
        raise ValueError(f"unsupported image mode {mode!r}; supported: {', '.join(MODES)}")
    if not isinstance(img, Image.Image):
        raise TypeError(f"image.process expects a PIL.Image.Image, got {type(img).__name__}")
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError(f"image has zero size ({w}x{h})")
    img = to_rgb(img)
    if mode == "anyres":
        canvas = anyres.select_best_resolution((h, w), pinpoints or anyres.default_pinpoints(image_size))
        return torch.stack([normalize(v, mean, std) for v in tiles(img, canvas, image_size)]), (h, w)
    if mode == "squash":
        return normalize(img.resize((image_size, image_size), Image.Resampling.BICUBIC), mean, std), (h, w)
    if mode == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in mean))   # (122, 116, 104) for CLIP
    return normalize(resize_shortest_edge_and_crop(img, image_size), mean, std), (h, w)


def process_images(imgs, config, mode=None):
    """One sample's images as the model takes them: [(pixels, image_sizes row, visual tokens), ...].

    Each image in `mode` (default: the config's), except that an AnyRes model given several images
    sees each as one padded square view with the image_sizes row (0, 0): LLaVA-OneVision's and the
    LLaVA-NeXT repository's rule for multi-image samples (the base view and one image_newline each).
    """
    mode = mode or config.image_aspect_ratio
    if mode == "anyres" and len(imgs) > 1:
        return [(process(im, "pad", config=config)[0][None], anyres.SQUARE_IMAGE_SIZE,
                 num_image_tokens(anyres.SQUARE_IMAGE_SIZE, "anyres", config)) for im in imgs]
    out = []
    for im in imgs:
        pixels, size = process(im, mode, config=config)
        out.append((pixels, size, num_image_tokens(size, mode, config)))
    return out


def num_image_tokens(size, mode="pad", config=None):
    """Visual tokens an image of `size` (h, w) becomes in `mode` (default config: LLaVA-1.5's
    CLIP-L/336). The count itself is nanollava.llava.num_image_tokens, beside the code that makes them."""
    if mode not in MODES:
        raise ValueError(f"unsupported image mode {mode!r}; supported: {', '.join(MODES)}")
    config = config or LLaVAConfig()
    if mode != config.image_aspect_ratio:
        config = LLaVAConfig(**{**config.__dict__, "image_aspect_ratio": mode})
    return _num_image_tokens(config, size)
