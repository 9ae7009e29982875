"""Image preprocessing for the CLIP vision tower (CLIP paper; LLaVA-1.5 paper §3 "pad").

  crop  resize the shortest edge to image_size (PIL bicubic) + center crop (CLIPImageProcessor)
  pad   paste centered on a square of side max(w, h) filled with the mean colour (122, 116, 104),
        then the CLIP steps (original LLaVA `expand2square`, image_aspect_ratio="pad")

  anyres  LLaVA-NeXT AnyRes: a base view squashed to image_size plus the image_size tiles of the
        image fitted onto the best grid pinpoint (geometry in nanollava/anyres.py)

then x / 255, normalise with the CLIP mean / std. Matches transformers' CLIPImageProcessor
(PIL backend) to float rounding, including its RGB conversion (alpha composited onto white)
and its resize-size rounding (long edge = int(size * long / short)).

Speed: the crop is folded into PIL's resize (`box=`), so only the kept square is resampled
(same filter taps as resize-then-crop, since PIL clips taps at the image, not the box), and
the result goes PIL -> torch in one copy.
"""
import torch
from PIL import Image

from nanollava import anyres

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("crop", "pad", "anyres")


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
    # resize the whole image, then crop, as HF does: resizing only the kept box (PIL's `box=`)
    # samples the box edges differently and is off by up to 24/255 on tiny images
    return img.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))


def normalize(img, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 RGB PIL image -> (3, H, W) float32 ((x / 255) - mean) / std."""
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)          # one copy out of PIL
    x = x.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()     # (3, H, W) uint8: cheap
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return x.to(torch.float32).mul_(scale).sub_(shift)                        # (x / 255 - mean) / std


def process(img, mode="pad", image_size=336, mean=CLIP_MEAN, std=CLIP_STD, pinpoints=None, convention="hf",
            config=None):
    """PIL image -> (pixels (3, image_size, image_size) float32, original size (height, width)).

    mode="anyres": pixels are (1 + gh*gw, 3, image_size, image_size), base view first; `pinpoints`
    in the reading order of `convention` (default LLaVA-v1.6's), or all three taken from `config`
    (a LLaVAConfig: its pinpoints, anyres_convention and vision.image_size).
    """
    if mode not in MODES:
        raise ValueError(f"unsupported image mode {mode!r}; supported: {', '.join(MODES)}")
    if not isinstance(img, Image.Image):
        raise TypeError(f"image.process expects a PIL.Image.Image, got {type(img).__name__}")
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError(f"image has zero size ({w}x{h})")
    img = to_rgb(img)
    if mode == "anyres":
        if config is not None:
            pinpoints, convention = anyres.config_pinpoints(config), config.anyres_convention
            image_size = config.vision.image_size
        pinpoints = anyres.parse_pinpoints(pinpoints or anyres.DEFAULT_PINPOINTS, image_size)
        canvas = anyres.select_best_resolution((h, w), pinpoints, convention)
        views = anyres.tiles(img, canvas, image_size)
        return torch.stack([normalize(v, mean, std) for v in views]), (h, w)
    if mode == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in mean))   # (122, 116, 104) for CLIP
    img = resize_shortest_edge_and_crop(img, image_size)
    return normalize(img, mean, std), (h, w)


def num_image_tokens(size, mode="pad", config=None):
    """Visual tokens one image becomes: (image_size // patch_size)**2, +1 for the CLS with "full";
    AnyRes: anyres.num_image_tokens (base + unpadded grid + one newline per row)."""
    if mode not in MODES:
        raise ValueError(f"unsupported image mode {mode!r}; supported: {', '.join(MODES)}")
    if mode == "anyres":
        if config is None:
            return anyres.token_count(size, anyres.DEFAULT_PINPOINTS)
        return anyres.num_image_tokens(size, config)
    if config is None:
        return (336 // 14) ** 2
    n = (config.vision.image_size // config.vision.patch_size) ** 2
    return n + (config.vision_feature_select_strategy == "full")
