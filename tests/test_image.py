"""image.process against transformers' CLIPImageProcessor (PIL backend) on real photos."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nanollava import image
from nanollava.config import LLaVAConfig, VisionConfig
from nanollava.llava import num_image_tokens

skdata = pytest.importorskip("skimage.data")
clip_pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402

STD = torch.tensor(image.CLIP_STD).view(3, 1, 1)
ONE_LEVEL = 1 / 255 + 1e-5        # tolerance in [0, 1] pixel units (before normalisation)


def hf_processor(size=336):
    return clip_pil.CLIPImageProcessorPil(size={"shortest_edge": size},
                                          crop_size={"height": size, "width": size})


def hf_reference(img, mode, size=336):
    """HF pixel_values; pad = HF's RGB conversion, explicit square pad (LLaVA expand2square), HF."""
    if mode == "pad":
        rgb = Image.fromarray(hf_convert_to_rgb(img, return_numpy=True))
        w, h = rgb.size
        side = max(w, h)
        sq = Image.new("RGB", (side, side), (122, 116, 104))
        sq.paste(rgb, ((side - w) // 2, (side - h) // 2))
        img = sq
    return hf_processor(size)(img, return_tensors="pt")["pixel_values"][0]


def max_pixel_diff(a, b):
    """Largest difference in [0, 1] pixel units."""
    return ((a - b).abs() * STD).max().item()


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "logo", "camera"]


@pytest.fixture(scope="module")
def photos():
    return {name: Image.fromarray(getattr(skdata, name)()) for name in PHOTOS}


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_hf_clip_processor_on_photos(photos, name, mode):
    img = photos[name]
    x, size = image.process(img, mode)
    assert x.shape == (3, 336, 336) and x.dtype == torch.float32
    assert size == (img.height, img.width)
    d = max_pixel_diff(x, hf_reference(img, mode))
    assert d <= ONE_LEVEL, f"{name} ({img.mode} {img.size}) {mode}: off by {d * 255:.2f}/255"


@settings(max_examples=25, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(["crop", "pad"]),
       size=st.sampled_from([28, 56, 336]), seed=st.integers(0, 2**16))
def test_matches_hf_on_random_sizes(w, h, mode, size, seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    x, got = image.process(img, mode, image_size=size)
    assert x.shape == (3, size, size) and got == (h, w)
    d = max_pixel_diff(x, hf_reference(img, mode, size))
    assert d <= ONE_LEVEL, f"{w}x{h} {mode}@{size}: off by {d * 255:.2f}/255"


@pytest.mark.parametrize("pil_mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I"])
def test_every_pil_mode_converts_like_hf(pil_mode):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 70, 4), dtype=np.uint8))
    if pil_mode == "P+transparency":
        img = rgba.convert("RGB").convert("P")
        img.info["transparency"] = 3
    elif pil_mode == "I":
        img = rgba.convert("L").convert("I")
    else:
        img = rgba.convert(pil_mode)
    for mode in ("crop", "pad"):
        x, _ = image.process(img, mode, image_size=28)
        assert max_pixel_diff(x, hf_reference(img, mode, 28)) <= ONE_LEVEL


def test_rgba_is_composited_onto_white_like_hf():
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))           # fully transparent red
    assert image.to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_pad_fills_with_the_clip_mean_colour():
    img = Image.new("RGB", (100, 20), (0, 0, 0))                  # wide: bands above and below
    x, _ = image.process(img, "pad", image_size=28)
    mean_colour = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(image.CLIP_MEAN)) / torch.tensor(image.CLIP_STD)
    assert torch.allclose(x[:, 0, :], mean_colour.view(3, 1).expand(3, 28), atol=1e-5)
    assert x[:, 14, 14].lt(-1).all(), "the black image sits in the middle"


def test_unknown_mode_lists_supported_modes():
    with pytest.raises(ValueError, match="crop, pad"):
        image.process(Image.new("RGB", (8, 8)), mode="stretch")
    with pytest.raises(ValueError, match="crop, pad"):
        image.num_image_tokens((8, 8), mode="stretch")


def test_zero_size_and_non_pil_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="zero size"):
        image.process(Image.new("RGB", (0, 5)), "pad")
    with pytest.raises(TypeError, match="PIL"):
        image.process(np.zeros((4, 4, 3), np.uint8), "pad")


def test_num_image_tokens_crop_pad():
    assert image.num_image_tokens((480, 640), "pad") == 576
    cfg = LLaVAConfig()
    assert image.num_image_tokens((480, 640), "crop", cfg) == 576
    full = LLaVAConfig(vision_feature_select_strategy="full")
    assert image.num_image_tokens((480, 640), "pad", full) == 577
    tiny = LLaVAConfig(vision=VisionConfig(image_size=64, patch_size=8))
    assert image.num_image_tokens((64, 64), "pad", tiny) == 64 == num_image_tokens(tiny, (64, 64))
