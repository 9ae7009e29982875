"""AnyRes (LLaVA-NeXT): geometry, token counts, pixels and model parity.

Oracles: transformers' LlavaNext (select_best_resolution, get_anyres_image_grid_shape,
image_size_to_num_patches, unpad_image, LlavaNextProcessor, LlavaNextImageProcessorPil,
LlavaNextForConditionalGeneration). The original code (LLaVA-VL/LLaVA-NeXT `llava/mm_utils.py` /
`llava_arch.py`, which takes and returns (width, height)) is transcribed below: the loader turns its
[w, h] pinpoints into the [h, w] list that makes the same choices, and where its int() truncation
differs from transformers' rounding nanollava follows transformers (docs/anyres.md).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nanollava import anyres
from nanollava.checkpoint import parse_pinpoints

PINPOINTS = anyres.DEFAULT_PINPOINTS          # LLaVA-v1.6: [[336, 672], [672, 336], [672, 672], ...]
ORIGINAL = parse_pinpoints(PINPOINTS, 336, "config.json", original=True)   # the same list read as [w, h]
GEOMETRY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def grid6(tile=336):
    return parse_pinpoints("(1x1),...,(6x6)", tile, "config.json")


def num_tokens(size, pinpoints, anyres_max=None, tile=336, side=24):
    return anyres.num_tokens(size, pinpoints, tile, side, anyres_max)


# ----------------------------------------------------------------------------- original code (w, h)

def original_select_best_resolution(original_size, possible_resolutions):
    """LLaVA-NeXT mm_utils.select_best_resolution, verbatim logic: sizes are (width, height)."""
    original_width, original_height = original_size
    best_fit, max_effective_resolution, min_wasted_resolution = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution, min_wasted_resolution = effective_resolution, wasted_resolution
            best_fit = (width, height)
    return best_fit


def original_unpad_shape(current_size, original_size):
    """llava_arch.unpad_image's output (h, w): original_size is image.size = (width, height); int() truncation."""
    original_width, original_height = original_size
    current_height, current_width = current_size
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        return current_height - 2 * ((current_height - new_height) // 2), current_width
    new_width = int(original_width * (current_height / original_height))
    return current_height, current_width - 2 * ((current_width - new_width) // 2)


# ----------------------------------------------------------------------------- strategies

def image_sizes():
    """(h, w): anything from 1x1 to 4000x4000, thin strips both ways, exact pinpoint sizes and
    their halves/doubles (tie cases), and small images (every candidate keeps all pixels)."""
    exact = st.sampled_from([(a, b) for a, b in PINPOINTS] + [(b, a) for a, b in PINPOINTS]
                            + [(336, 336), (672, 672), (168, 336), (2016, 672), (1008, 1008)])
    return st.one_of(
        st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
        st.tuples(st.integers(1, 4000), st.integers(1, 300)),
        st.tuples(st.integers(1, 300), st.integers(1, 4000)),
        st.tuples(st.integers(1, 64), st.integers(1, 64)),
        exact,
    )


# ----------------------------------------------------------------------------- pure geometry

@pytest.mark.parametrize("w,h,expected", [(1024, 899, 2634), (640, 480, 2340), (500, 500, 2928),
                                          (1000, 300, 2182), (800, 400, 1752)])
def test_original_checkpoints_reproduce_worked_token_counts(w, h, expected):
    """The worked counts of the original code (docs/anyres.md; sizes W x H, nanollava takes (h, w)),
    from the loader's [h, w] reading of the original pinpoint list."""
    assert num_tokens((h, w), ORIGINAL) == expected


def test_tie_order_flips_tile_layout_for_small_images():
    """A small image fits every candidate fully, so the smallest canvas wins and the first of the
    tied [336, 672] / [672, 336] is taken: HF reads it as 1 row x 2 cols, the original as 2 x 1, and
    the loader's swapped list keeps the original's choice."""
    for size in [(1, 1), (100, 100), (200, 120), (120, 200), (336, 336)]:
        assert anyres.grid_shape(size, PINPOINTS, 336) == (1, 2)
        assert anyres.grid_shape(size, ORIGINAL, 336) == (2, 1)
        w, h = original_select_best_resolution(size[::-1], PINPOINTS)
        assert anyres.select_best_resolution(size, ORIGINAL) == (h, w)


def test_parse_pinpoints_generated_grid_and_strings():
    grid = parse_pinpoints("(1x1),...,(6x6)", 384, "c.json")
    assert len(grid) == 36 and grid[0] == [384, 384] and grid[1] == [384, 768] and grid[-1] == [2304, 2304]
    assert parse_pinpoints("[[336, 672], [672, 336]]", 336, "c.json") == [[336, 672], [672, 336]]
    # first and last cell span the range, as in LLaVA-OneVision's get_anyres_image_grid_shape
    assert parse_pinpoints("(1x2),(3x3)", 336, "c.json") == [[i * 336, j * 336] for i in (1, 2, 3) for j in (2, 3)]
    with pytest.raises(ValueError, match=r"c.json: image_grid_pinpoints = \[\[336, 700\]\] must be positive multiples"):
        parse_pinpoints([[336, 700]], 336, "c.json")


@GEOMETRY
@given(size=image_sizes())
def test_geometry_matches_hf_and_original(size):
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches)
    h, w = size
    assert anyres.select_best_resolution(size, PINPOINTS) == hf_select(size, PINPOINTS)
    assert anyres.grid_shape(size, PINPOINTS, 336) == get_anyres_image_grid_shape(size, PINPOINTS, 336)
    gh, gw = anyres.grid_shape(size, PINPOINTS, 336)
    assert 1 + gh * gw == image_size_to_num_patches(size, PINPOINTS, 336)
    ow, oh = original_select_best_resolution((w, h), PINPOINTS)
    assert anyres.select_best_resolution(size, ORIGINAL) == (oh, ow)


def test_unpad_follows_transformers_where_the_original_truncates():
    """55 * (48 / 176) = 14.999999999999998: transformers rounds to 15 (keeps 16 rows after the
    symmetric cut), the original truncates to 14 (keeps 14). nanollava computes 55 * 48 // 176 = 15
    exactly, as transformers; one of 36 such sizes up to 1199 x 1199 with the v1.6 pinpoints."""
    assert 55 * (48 / 176) < 15
    assert anyres.unpad_shape((24, 48), (55, 176)) == (16, 48)
    assert original_unpad_shape((24, 48), (176, 55)) == (14, 48)


@GEOMETRY
@given(size=image_sizes(), grid=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_unpad_matches_hf_and_the_original_but_for_its_float_truncation(size, grid):
    from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad
    h, w = size
    H, W = grid[0] * 24, grid[1] * 24
    t = torch.zeros(1, H, W)
    assert anyres.unpad_shape((H, W), size) == tuple(hf_unpad(t, list(size)).shape[1:])
    ours, orig = anyres.unpad_shape((H, W), size), original_unpad_shape((H, W), (w, h))
    if ours != orig:      # only where the kept side is a whole number that int() sees as x.999...
        assert (h * W % w == 0 and int(h * (W / w)) < h * W // w) or (w * H % h == 0 and int(w * (H / h)) < w * H // h)


@pytest.fixture(scope="module")
def hf_processor():
    """A real LlavaNextProcessor (PIL image backend) with a 5-word tokenizer, v1.6 settings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "hi": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14, image_token="<image>",
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _pack(size, pinpoints, anyres_max=None, channels=3):
    """Run the model-side packing on random features; returns the packed (N, C) tensor."""
    gh, gw = anyres.grid_shape(size, pinpoints, 336)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(576, channels, generator=g)
    tiles = torch.randn(gh * gw, 576, channels, generator=g)
    newline = torch.randn(channels, generator=g)
    return anyres.pack_image_features(base, tiles, size, (gh, gw), newline, anyres_max)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(size=image_sizes())
def test_anyres_token_count_matches_features_and_hf_processor(hf_processor, size):
    h, w = size
    n = num_tokens(size, PINPOINTS)
    assert n == len(_pack(size, PINPOINTS))
    # HF counts the CLS of the base view, then drops one for vision_feature_select_strategy="default"
    assert n == hf_processor._get_number_of_features(h, w, 336, 336) - 1
    assert num_tokens(size, ORIGINAL) == len(_pack(size, ORIGINAL))


@pytest.mark.parametrize("size", [(899, 1024), (1, 1), (300, 4000), (4000, 300), (672, 336)])
def test_hf_processor_inserts_num_image_tokens_placeholders(hf_processor, size):
    img = Image.new("RGB", size[::-1], (10, 200, 30))
    out = hf_processor(images=img, text="<image> hi", return_tensors="pt")
    assert int((out["input_ids"] == 3).sum()) == num_tokens(size, PINPOINTS)
    gh, gw = anyres.grid_shape(size, PINPOINTS, 336)
    assert out["pixel_values"].shape[1] == 1 + gh * gw


def test_pack_layout_base_first_newline_after_every_row():
    size, newline = (400, 1000), torch.full((2,), -1.0)
    gh, gw = anyres.grid_shape(size, PINPOINTS, 336)                # (1, 3): 24 x 72 grid
    base = torch.zeros(576, 2)
    # tile t, row r, col c -> value (t, r * 24 + c) so the stitched grid position is recoverable
    tiles = torch.stack([torch.stack([torch.full((576,), float(t)), torch.arange(576.0)], -1) for t in range(3)])
    out = anyres.pack_image_features(base, tiles, size, (gh, gw), newline)
    h, w = anyres.unpad_shape((24, 72), size)
    assert torch.equal(out[:576], base)
    grid = out[576:].view(h, w + 1, 2)
    assert (grid[:, -1] == -1).all(), "every row must end with image_newline"
    top, left = (24 - h) // 2, (72 - w) // 2                          # 1000 / 400 -> columns are cut
    assert (top, left) == (0, 6)
    for r in (0, h - 1):
        for c in (0, w // 2, w - 1):
            col = c + left
            assert grid[r, c].tolist() == [float(col // 24), float((r + top) * 24 + col % 24)]


@GEOMETRY
@given(size=image_sizes(), n=st.integers(1, 9))
def test_anyres_max_caps_tokens_and_never_shrinks_at_or_below_1_1(size, n):
    pp = grid6()
    free = num_tokens(size, pp) - 576                          # grid tokens without anyres_max
    capped = num_tokens(size, pp, anyres_max=n)
    gh, gw = anyres.grid_shape(size, pp, 336)
    h, w = anyres.unpad_shape((gh * 24, gw * 24), size)
    t = math.sqrt(h * w / (n * 576))
    if t > 1.1:
        nh, nw = int(h // t), int(w // t)
        assert capped == 576 + nh * (nw + 1)
        assert nh * nw <= n * 576, "the shrunk grid holds at most N tiles' worth of features"
    else:
        assert capped == 576 + free
    assert capped <= 576 + free


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=image_sizes(), n=st.one_of(st.none(), st.integers(1, 9)), six=st.booleans())
def test_packing_matches_hf_llava_next_and_onevision_pack_image_features(size, n, six):
    """HF's own packing as the oracle: LlavaNextModel.pack_image_features (no cap) and
    LlavaOnevisionModel.pack_image_features (anyres_max_N), called on the same features;
    a 1-view image is the single-image branch (base + newline) of both."""
    from types import SimpleNamespace
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    pp = grid6() if six else PINPOINTS
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=336, patch_size=14),
                                                  image_grid_pinpoints=pp))
    gh, gw = anyres.grid_shape(size, pp, 336)
    g = torch.Generator().manual_seed(sum(size))
    feats, newline = torch.randn(1 + gh * gw, 576, 3, generator=g), torch.randn(3, generator=g)
    ours = anyres.pack_image_features(feats[0], feats[1:], size, (gh, gw), newline, anyres_max=n)
    if n is None:
        (want,), _ = LlavaNextModel.pack_image_features(fake, [feats], torch.tensor([size]), "default", newline)
    else:
        (want,), _ = LlavaOnevisionModel.pack_image_features(fake, [feats], torch.tensor([size]), newline,
                                                             f"anyres_max_{n}")
    torch.testing.assert_close(ours, want)
    assert len(ours) == num_tokens(size, pp, anyres_max=n)
    (single,), _ = LlavaOnevisionModel.pack_image_features(fake, [feats[:1]], torch.tensor([size]), newline)
    torch.testing.assert_close(torch.cat([feats[0], newline[None]]), single)   # LLaVA.encode_images' (0, 0) row


def test_anyres_max_packing_is_bilinear_resize_of_the_unpadded_grid():
    size, n = (1500, 2000), 4
    pp = grid6()
    gh, gw = anyres.grid_shape(size, pp, 336)
    g = torch.Generator().manual_seed(1)
    base, tiles, newline = torch.randn(576, 5, generator=g), torch.randn(gh * gw, 576, 5, generator=g), torch.zeros(5)
    out = anyres.pack_image_features(base, tiles, size, (gh, gw), newline, anyres_max=n)
    assert len(out) == num_tokens(size, pp, anyres_max=n)
    from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad
    grid = tiles.view(gh, gw, 24, 24, 5).permute(4, 0, 2, 1, 3).reshape(5, gh * 24, gw * 24)
    grid = hf_unpad(grid, list(size))
    h, w = grid.shape[1:]
    t = math.sqrt(h * w / (n * 576))
    assert t > 1.1
    want = F.interpolate(grid[None], size=(int(h // t), int(w // t)), mode="bilinear")[0]
    got = out[576:].view(want.shape[1], want.shape[2] + 1, 5)[:, :-1].permute(2, 0, 1)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- pixels

def _photo(name):
    import skimage.data
    return Image.fromarray(getattr(skimage.data, name)())


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_anyres_pixels_match_hf_image_processor_on_photos(hf_processor, name):
    from nanollava import image
    img = _photo(name)
    ours, size = image.process(img, mode="anyres")
    ref = hf_processor.image_processor(img, return_tensors="pt")
    assert tuple(ref["image_sizes"][0].tolist()) == size == (img.height, img.width)
    assert ours.shape == ref["pixel_values"][0].shape, "same number of tiles (base view first)"
    # pixels are ((x / 255) - mean) / std: 1/255 in pixel space is 1 / (255 * std) here
    tol = 1.0 / (255 * 0.26130258)
    assert (ours - ref["pixel_values"][0]).abs().max() <= tol


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(size=st.tuples(st.integers(1, 1200), st.integers(1, 1200)), seed=st.integers(0, 2 ** 16))
def test_anyres_pixels_match_hf_image_processor_random_sizes(hf_processor, size, seed):
    from nanollava import image
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    ours, got_size = image.process(img, mode="anyres")
    ref = hf_processor.image_processor(img, return_tensors="pt")["pixel_values"][0]
    assert got_size == size and ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1.0 / (255 * 0.26130258)
    assert image.num_image_tokens(size, mode="anyres") == num_tokens(size, PINPOINTS)


def test_original_pinpoints_tile_the_small_image_vertically():
    """Same image, original reading of the v1.6 pinpoints: a 2-rows x 1-col canvas (672 x 336)."""
    from nanollava import image
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    hf_px, _ = image.process(img, mode="anyres")
    orig_px, _ = image.process(img, mode="anyres", pinpoints=ORIGINAL)
    assert hf_px.shape[0] == orig_px.shape[0] == 3
    # HF canvas 336 x 672 (h x w): image fills the height, black bars left/right of the pair
    # original canvas 672 x 336: image fills the width, black bars above/below
    black = image.normalize(Image.new("RGB", (1, 1)))[:, 0, 0]
    assert torch.allclose(hf_px[1, :, 168, 0], black) and not torch.allclose(hf_px[1, :, 0, 335], black)
    assert torch.allclose(orig_px[1, :, 0, 168], black) and not torch.allclose(orig_px[1, :, 335, 168], black)


# ----------------------------------------------------------------------------- model parity

TILE, PATCH = 28, 7            # tiny tower: 28 px views, 4 x 4 = 16 features per view
MODEL_PINPOINTS = {
    "v1.6 shape": [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]],
    "(1x1),...,(3x3)": parse_pinpoints("(1x1),...,(3x3)", TILE, "config.json"),
    "wide only": [[TILE, 2 * TILE], [TILE, 4 * TILE], [2 * TILE, 3 * TILE]],
}


def hf_llava_next(pinpoints, seed=0, vocab=64, text_config=None):
    """A random-weight transformers LlavaNextForConditionalGeneration (eager attention, float32)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=TILE, patch_size=PATCH, projection_dim=8)
    tc = text_config or LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                    pad_token_id=0, max_position_embeddings=1024)
    config = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=vocab - 1,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(config).eval()
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():                 # non-trivial biases, norms and image_newline
            p.add_(0.1 * torch.randn_like(p))
    return model


def anyres_batch(sizes, pinpoints, vocab=64, seed=0):
    """One sample per image, right-padded: text, the image's run of placeholders, text.
    pixel_values (N, max views, 3, TILE, TILE) zero-padded, as HF's processor pads them."""
    from nanollava import image
    g = torch.Generator().manual_seed(seed)
    rows, pixels = [], []
    for k, (h, w) in enumerate(sizes):
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        px, _ = image.process(Image.fromarray(arr), mode="anyres", image_size=TILE, pinpoints=pinpoints)
        pixels.append(px)
        n = num_tokens((h, w), pinpoints, tile=TILE, side=TILE // PATCH)
        rows.append(torch.randint(1, vocab - 1, (3 + k,), generator=g).tolist() + [vocab - 1] * n
                    + torch.randint(1, vocab - 1, (4,), generator=g).tolist())
    T, V = max(map(len, rows)), max(p.shape[0] for p in pixels)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, :len(ids)], mask[b, :len(ids)] = torch.tensor(ids), 1
    pixel_values = torch.stack([torch.cat([p, p.new_zeros(V - len(p), *p.shape[1:])]) for p in pixels])
    return input_ids, mask, pixel_values, torch.tensor(sizes, dtype=torch.long)


def hf_forward(hf, input_ids, mask, pixel_values, image_sizes):
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def assert_close_logits(got, want, mask):
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    tol = 1e-4 * max(1.0, want[real].abs().max().item())
    assert diff <= tol, f"logits differ from transformers LlavaNext by {diff:.3g} (tolerance {tol:.3g})"


MODEL = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
small_sizes = st.tuples(st.integers(1, 160), st.integers(1, 160))


@MODEL
@given(which=st.sampled_from(sorted(MODEL_PINPOINTS)), sizes=st.lists(small_sizes, min_size=2, max_size=3),
       seed=st.integers(0, 100))
def test_llava_next_checkpoint_gives_transformers_logits(tmp_path_factory, which, sizes, seed):
    """HF-saved LlavaNext -> LLaVA.from_pretrained: same logits on a batch whose images have
    different tile counts (padded views ignored), and the feature count equals num_image_tokens."""
    from nanollava.llava import LLaVA, num_image_tokens
    pinpoints = MODEL_PINPOINTS[which]
    hf = hf_llava_next(pinpoints, seed)
    d = tmp_path_factory.mktemp("llava_next")
    hf.save_pretrained(d)
    model = LLaVA.from_pretrained(str(d)).eval()
    assert model.config.image_aspect_ratio == "anyres"
    batch = anyres_batch(sizes, pinpoints, seed=seed)
    with torch.no_grad():
        feats = model.encode_images(batch[2], batch[3])
        got = model(batch[0], pixel_values=batch[2], image_sizes=batch[3], attention_mask=batch[1])
    for f, size in zip(feats, sizes):
        assert len(f) == num_image_tokens(model.config, size)
    assert_close_logits(got, hf_forward(hf, *batch), batch[1])


def next_family_text_configs():
    """The LLMs of the LLaVA-NeXT family, tiny: (name, text config, a line of its chat template, template)."""
    from transformers import LlamaConfig, MistralConfig
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                 rms_norm_eps=1e-5, pad_token_id=0, max_position_embeddings=1024)
    return [
        ("llava-v1.6-mistral-7b-hf", MistralConfig(**small, num_key_value_heads=2, sliding_window=1024),
         "{{ '[INST] ' }}{{ content['text'] }}{{' [/INST]' }}", "mistral_instruct"),
        ("llava-v1.6-34b-hf (Yi)", LlamaConfig(**small, num_key_value_heads=1, rope_theta=5e6),
         "{{ '<|im_start|>' + message['role'] + '\n' }}", "chatml_direct"),
        ("llama3-llava-next-8b-hf", LlamaConfig(**small, num_key_value_heads=2, rope_theta=5e5),
         "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}", "llava_llama_3"),
        ("llava-v1.6-vicuna-7b-hf", LlamaConfig(**small, num_key_value_heads=4),
         "{{ 'USER: ' }}{{ content['text'] }}{{ ' ASSISTANT:' }}", "vicuna_v1"),
    ]


@pytest.mark.parametrize("name,text,chat_template,template", next_family_text_configs(),
                         ids=[c[0] for c in next_family_text_configs()])
def test_llava_next_families_load_with_their_template_and_transformers_logits(tmp_path, name, text, chat_template,
                                                                              template):
    from nanollava.llava import LLaVA
    hf = hf_llava_next(MODEL_PINPOINTS["v1.6 shape"], seed=2, text_config=text)
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(chat_template)
    model = LLaVA.from_pretrained(str(tmp_path)).eval()
    assert model.config.template == template
    batch = anyres_batch([(70, 30), (20, 100)], MODEL_PINPOINTS["v1.6 shape"], seed=8)
    with torch.no_grad():
        got = model(batch[0], pixel_values=batch[2], image_sizes=batch[3], attention_mask=batch[1])
    assert_close_logits(got, hf_forward(hf, *batch), batch[1])


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    """(HF LlavaNext oracle, its save_pretrained directory) with v1.6-shaped pinpoints."""
    hf = hf_llava_next(MODEL_PINPOINTS["v1.6 shape"], seed=7)
    d = tmp_path_factory.mktemp("next_pair")
    hf.save_pretrained(d)
    return hf, str(d)


def test_llava_next_greedy_tokens_match_transformers_generate(next_pair):
    from nanollava.generate import generate
    from nanollava.llava import LLaVA
    hf, d = next_pair
    model = LLaVA.from_pretrained(d).eval()
    input_ids, mask, pixel_values, image_sizes = anyres_batch([(90, 40)], MODEL_PINPOINTS["v1.6 shape"], seed=3)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                           image_sizes=image_sizes, max_new_tokens=24, do_sample=False)[:, input_ids.shape[1]:]
    got = generate(model, input_ids, pixel_values, image_sizes, attention_mask=mask, max_new_tokens=24,
                   eos_token_id=[])
    assert got.tolist() == want.tolist()


def test_anyres_save_pretrained_loads_in_transformers_as_llava_next(next_pair, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    from nanollava.llava import LLaVA
    hf, d = next_pair
    model = LLaVA.from_pretrained(d).eval()
    model.save_pretrained(str(tmp_path))
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    for c in (back.config, back.config.text_config, back.config.vision_config):
        c._attn_implementation = "eager"
    assert back.config.image_grid_pinpoints == MODEL_PINPOINTS["v1.6 shape"]
    torch.testing.assert_close(back.model.image_newline, model.image_newline)
    batch = anyres_batch([(50, 120), (33, 20)], MODEL_PINPOINTS["v1.6 shape"], seed=4)
    assert_close_logits(hf_forward(back, *batch), hf_forward(hf, *batch), batch[1])
    reloaded = LLaVA.from_pretrained(str(tmp_path))
    assert reloaded.config == model.config


def _state(directory):
    from safetensors.torch import load_file
    return load_file(os.path.join(directory, "model.safetensors"))


def _write(directory, config, state):
    import json
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))


def _hub_keys(state):
    """Whatever layout transformers saved, the llava-hf Hub (old) names, via nanollava's table."""
    from nanollava.checkpoint import rename_key
    return {rename_key(k): v for k, v in state.items() if rename_key(k)}


def test_both_llava_hf_key_layouts_load_with_image_newline(next_pair, tmp_path):
    import json
    from nanollava.llava import LLaVA
    hf, d = next_pair
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    old = _hub_keys(_state(d))
    assert "image_newline" in old
    new = {}
    for k, v in old.items():
        for src, dst in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("image_newline", "model.image_newline")]:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        new[k] = v
    batch = anyres_batch([(70, 30), (20, 100)], MODEL_PINPOINTS["v1.6 shape"], seed=5)
    want = hf_forward(hf, *batch)
    for name, state in (("old", old), ("new", new)):
        _write(str(tmp_path / name), config, state)
        model = LLaVA.from_pretrained(str(tmp_path / name)).eval()
        with torch.no_grad():
            got = model(batch[0], pixel_values=batch[2], image_sizes=batch[3], attention_mask=batch[1])
        assert_close_logits(got, want, batch[1])


def test_original_llava16_checkpoint_loads_with_its_pinpoints_read_as_width_height(next_pair, tmp_path):
    """Original LLaVA-v1.6 layout: mm_* config, (w, h) pinpoints, spatial_unpad, model.image_newline,
    tuned tower under model.vision_tower.vision_tower.vision_model.*, CLIP config beside it."""
    import json
    from nanollava.llava import LLaVA
    hf, d = next_pair
    old = _hub_keys(_state(d))
    state = {}
    for k, v in old.items():
        for src, dst in [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
                         ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                         ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                         ("image_newline", "model.image_newline")]:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        state[k] = v
    text = hf.config.text_config.to_dict()
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    with open(clip_dir / "config.json", "w") as f:
        json.dump(dict(hf.config.vision_config.to_dict(), model_type="clip_vision_model"), f)
    hw = MODEL_PINPOINTS["v1.6 shape"]
    config = dict(text, architectures=["LlavaLlamaForCausalLM"], model_type="llava",
                  mm_vision_tower=str(clip_dir), mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_hidden_size=16, image_aspect_ratio="anyres",
                  mm_patch_merge_type="spatial_unpad", image_token_index=hf.config.image_token_index,
                  image_grid_pinpoints=[[w, h] for h, w in hw])          # the original stores (w, h)
    _write(str(tmp_path / "orig"), config, state)
    model = LLaVA.from_pretrained(str(tmp_path / "orig")).eval()
    assert model.config.image_grid_pinpoints == hw, "stored as the equivalent HF [h, w] list"
    sizes = [(70, 30), (20, 100), (5, 5)]
    batch = anyres_batch(sizes, hw, seed=6)
    with torch.no_grad():
        got = model(batch[0], pixel_values=batch[2], image_sizes=batch[3], attention_mask=batch[1])
    assert_close_logits(got, hf_forward(hf, *batch), batch[1])


def test_square_images_mix_with_anyres_images_in_one_batch(next_pair):
    """image_sizes (0, 0) marks a plain pad/crop image: 1 view, base features + image_newline."""
    from nanollava import image
    from nanollava.llava import LLaVA, num_image_tokens
    hf, d = next_pair
    model = LLaVA.from_pretrained(d).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    tiles_px, size = image.process(img, mode="anyres", config=model.config)
    square_px, _ = image.process(img, mode="pad", image_size=TILE)
    pixel_values = torch.zeros(2, len(tiles_px), 3, TILE, TILE)
    pixel_values[0], pixel_values[1, 0] = tiles_px, square_px
    image_sizes = torch.tensor([size, anyres.SQUARE_IMAGE_SIZE])
    with torch.no_grad():
        feats = model.encode_images(pixel_values, image_sizes)
        alone = model.encode_images(tiles_px[None], torch.tensor([size]))[0]
        base = model.project_images(square_px[None])[0]
    assert len(feats[1]) == num_image_tokens(model.config, anyres.SQUARE_IMAGE_SIZE) == 16 + 1
    torch.testing.assert_close(feats[1], torch.cat([base, model.image_newline[None]]))
    torch.testing.assert_close(feats[0], alone)


# ----------------------------------------------------------------------------- data pipeline

def test_dataset_emits_anyres_samples_the_model_consumes(tmp_path):
    """LLaVADataset + collate with image_aspect_ratio="anyres": views padded to the batch's most,
    image_sizes (h, w), and exactly num_image_tokens placeholders per image; the model's loss runs."""
    import json
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
    from nanollava.data import LLaVADataset, collate
    from nanollava.llava import LLaVA
    from nanollava.tokenizer import Tokenizer
    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "what", "color", "red", "blue", "USER", "ASSISTANT", ":"]
    hf_tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok.add_special_tokens(["<image>", "<s>", "</s>", "<pad>"])
    tok = Tokenizer(hf_tok)
    for name, (h, w) in [("a.png", (40, 90)), ("b.png", (100, 30))]:
        Image.new("RGB", (w, h), (200, 10, 10)).save(tmp_path / name)
    records = [{"id": str(i), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "red"}]}
        for i, name in enumerate(["a.png", "b.png"])]
    (tmp_path / "d.json").write_text(json.dumps(records))
    pinpoints = MODEL_PINPOINTS["v1.6 shape"]
    config = LLaVAConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=TILE, patch_size=PATCH),
                         text=TextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4),
                         image_token_id=tok.image_token_id, image_aspect_ratio="anyres",
                         image_grid_pinpoints=pinpoints, template="vicuna_v1")
    ds = LLaVADataset(str(tmp_path / "d.json"), str(tmp_path), tok, config)
    batch = collate([ds[0], ds[1]], tok.pad_id)
    views = [1 + math.prod(anyres.grid_shape(s, pinpoints, TILE)) for s in [(40, 90), (100, 30)]]
    assert batch["image_sizes"].tolist() == [[40, 90], [100, 30]]
    assert batch["pixel_values"].shape == (2, max(views), 3, TILE, TILE)
    for b, v in enumerate(views):
        assert (batch["pixel_values"][b, v:] == 0).all(), "views past an image's own count are zero padding"
    for row, size in zip(batch["input_ids"], [(40, 90), (100, 30)]):
        assert int((row == tok.image_token_id).sum()) == num_tokens(size, pinpoints, tile=TILE, side=TILE // PATCH)
    model = LLaVA(config)
    loss = model.loss(batch["input_ids"], batch["labels"], batch["pixel_values"], batch["image_sizes"],
                      batch["attention_mask"])
    assert torch.isfinite(loss) and loss > 0


def test_original_config_pinpoint_string_and_anyres_max_are_read():
    """OneVision-style original config: "(1x1),...,(2x2)" cells read (w, h), image_aspect_ratio anyres_max_4."""
    from nanollava.checkpoint import read_original_config
    d = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
             mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_patch_merge_type="spatial_unpad",
             image_aspect_ratio="anyres_max_4", image_grid_pinpoints="(1x1),...,(2x3)")
    config = read_original_config(d, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=TILE, patch_size=PATCH), "c.json")
    assert config.image_aspect_ratio == "anyres" and config.anyres_max == 4
    # cells (i, j) = (w, h) in the original -> HF [h, w] = [j * TILE, i * TILE], same order
    assert config.image_grid_pinpoints == [[j * TILE, i * TILE] for i in (1, 2) for j in (1, 2, 3)]
