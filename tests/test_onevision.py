"""SigLIP, Qwen2 and LLaVA-OneVision against transformers: LlavaForConditionalGeneration on SigLIP + Qwen2
(llava-interleave's shape) and LlavaOnevisionForConditionalGeneration with one AnyRes image, several
images, and a video; the original lmms-lab layout; SigLIP and OneVision preprocessing.

Tiny random models saved by transformers are loaded by nanollava and checked three ways: logits
(1e-4 relative), 24 greedy tokens against transformers' generate, and batched against unbatched.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from nanollava import LLaVA, image  # noqa: E402
from nanollava.checkpoint import parse_pinpoints, rename_key  # noqa: E402
from nanollava.generate import generate  # noqa: E402
from nanollava.llava import num_image_tokens, num_video_tokens, pool2x2  # noqa: E402

V, TILE, PATCH = 96, 28, 7                  # 28 px views, 4 x 4 = 16 features each
IMG, VID = V - 2, V - 1
GRID = parse_pinpoints("(1x1),...,(3x3)", TILE, "config.json")


def tiny_siglip():
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=TILE, patch_size=PATCH,
                                           vision_use_head=False)


def tiny_qwen2(tied=True):
    return transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    rms_norm_eps=1e-5, tie_word_embeddings=tied, eos_token_id=None)


def perturbed(model):
    for c in [model.config, *(getattr(model.config, k) for k in ("text_config", "vision_config"))]:
        c._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():            # non-trivial biases, norms and image_newline
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_interleave(seed=0):
    """llava-interleave-qwen's shape: LlavaForConditionalGeneration on SigLIP (layer -1, "full") + tied Qwen2."""
    torch.manual_seed(seed)
    return perturbed(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=tiny_siglip(), text_config=tiny_qwen2(), image_token_id=IMG, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True)))


def hf_onevision(seed=0, anyres_max=2):
    torch.manual_seed(seed)
    return perturbed(transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(
        vision_config=tiny_siglip(), text_config=tiny_qwen2(), image_token_index=IMG, video_token_index=VID,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=GRID,
        vision_aspect_ratio=f"anyres_max_{anyres_max}", tie_word_embeddings=True)))


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    hf = hf_interleave()
    d = tmp_path_factory.mktemp("interleave")
    hf.save_pretrained(d)
    return hf, LLaVA.from_pretrained(str(d)), str(d)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    hf = hf_onevision()
    d = tmp_path_factory.mktemp("onevision")
    hf.save_pretrained(d)
    return hf, LLaVA.from_pretrained(str(d)), str(d)


def close(got, want, what="logits"):
    tol = 1e-4 * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what} differ from transformers by {err:.3g} (tolerance {tol:.3g})"


def rows(texts_and_images, seed=0):
    """Left-padded ids: per row, text, then each (token_id, count) run of placeholders, then text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for runs in texts_and_images:
        ids = torch.randint(1, V - 3, (3,), generator=g).tolist()
        for token, n in runs:
            ids += [token] * n + torch.randint(1, V - 3, (2,), generator=g).tolist()
        out.append(ids)
    T = max(map(len, out))
    input_ids, mask = torch.zeros(len(out), T, dtype=torch.long), torch.zeros(len(out), T, dtype=torch.long)
    for b, ids in enumerate(out):
        input_ids[b, T - len(ids):], mask[b, T - len(ids):] = torch.tensor(ids), 1
    return input_ids, mask


def random_image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- SigLIP + Qwen2 (llava-hf)

def test_siglip_qwen2_llava_loads_with_its_preprocessing_and_template_defaults(interleave):
    _, model, _ = interleave
    c = model.config
    assert c.vision.model_type == "siglip_vision_model" and c.text.qkv_bias and c.text.tie_word_embeddings
    assert c.image_aspect_ratio == "squash" and c.image_mean == c.image_std == (0.5, 0.5, 0.5)
    assert num_image_tokens(c, (50, 80)) == 16, "SigLIP: no class token, every patch with 'full'"


def test_qwen2_chatml_checkpoint_is_qwen_1_5_not_yis_chatml_direct(interleave, tmp_path):
    import shutil
    _, _, d = interleave
    shutil.copytree(d, tmp_path / "c")
    (tmp_path / "c" / "chat_template.jinja").write_text("{{ '<|im_start|>' + message['role'] + '\\n' }}")
    assert LLaVA.from_pretrained(str(tmp_path / "c")).config.template == "qwen_1_5"


def test_siglip_qwen2_llava_logits_greedy_and_batching_match_transformers(interleave):
    hf, model, _ = interleave
    ids, mask = rows([[(IMG, 16)], [(IMG, 16), (IMG, 16)]])
    pixels = torch.randn(3, 3, TILE, TILE)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=pos).logits
        got = model(ids, pixel_values=pixels, attention_mask=mask)
        close(got[mask.bool()], want[mask.bool()])
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=24,
                          do_sample=False)[:, ids.shape[1]:]
    out = generate(model, ids, pixels, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert out.tolist() == ref.tolist()
    alone = generate(model, ids[1:, mask[1].bool()], pixels[1:], max_new_tokens=24, eos_token_id=[])
    assert alone[0].tolist() == out[1].tolist(), "batched and unbatched generations differ"


def test_squash_pixels_match_siglip_image_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    hf = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    for k, (h, w, mode) in enumerate([(17, 333, "RGB"), (500, 90, "RGBA"), (384, 384, "L"), (1, 1, "P"), (77, 78, "RGB")]):
        img = random_image(h, w, k).convert(mode)
        want = hf(img, return_tensors="pt")["pixel_values"][0]
        got, size = image.process(img, mode="squash", image_size=384, mean=(0.5,) * 3, std=(0.5,) * 3)
        assert size == (h, w) and (got - want).abs().max() <= 1 / (255 * 0.5) + 1e-6, mode


# ----------------------------------------------------------------------------- LLaVA-OneVision (llava-hf)

def onevision_pixels(model, sizes, seed=0):
    """(N, max views, 3, TILE, TILE) AnyRes pixel values of random images, image_sizes, token counts."""
    views = [image.process(random_image(h, w, seed + k), config=model.config)[0] for k, (h, w) in enumerate(sizes)]
    n = max(len(v) for v in views)
    pixels = torch.stack([torch.cat([v, v.new_zeros(n - len(v), *v.shape[1:])]) for v in views])
    return pixels, torch.tensor(sizes), [num_image_tokens(model.config, s) for s in sizes]


def test_onevision_config_is_read(onevision):
    _, model, _ = onevision
    c = model.config
    assert (c.image_aspect_ratio, c.anyres_max, c.image_grid_pinpoints, c.video_token_id) == ("anyres", 2, GRID, VID)
    assert c.image_mean == c.image_std == (0.5, 0.5, 0.5), "no preprocessor_config.json: SigLIP's, never CLIP's"


def test_onevision_single_images_match_transformers_logits_and_greedy_tokens(onevision):
    hf, model, _ = onevision
    sizes = [(60, 100), (90, 30)]                    # 3 x 2 and 1 x ... grids, shrunk by anyres_max_2
    pixels, image_sizes, counts = onevision_pixels(model, sizes)
    ids, mask = rows([[(IMG, counts[0])], [(IMG, counts[1])]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=image_sizes,
                  position_ids=pos).logits
        close(model(ids, pixels, image_sizes, attention_mask=mask)[mask.bool()], want[mask.bool()])
        one = ids[:1, mask[0].bool()]                                      # row 0 without its padding
        ref = hf.generate(input_ids=one, pixel_values=pixels[:1], image_sizes=image_sizes[:1], max_new_tokens=24,
                          do_sample=False)[:, one.shape[1]:]
    out = generate(model, one, pixels[:1], image_sizes[:1], max_new_tokens=24, eos_token_id=[])
    assert out.tolist() == ref.tolist()
    both = generate(model, ids, pixels, image_sizes, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert both[0].tolist() == out[0].tolist(), "batched and unbatched generations differ"


def test_onevision_several_images_in_one_sample_match_transformers(onevision):
    """transformers' multi-image path (batch_num_images > 1): each image one padded-square view + newline;
    nanollava marks such images with the image_sizes row (0, 0)."""
    hf, model, _ = onevision
    imgs = [random_image(40, 70, 1), random_image(90, 20, 2)]
    pixels = torch.stack([image.process(im, mode="pad", config=model.config)[0] for im in imgs])[:, None]
    n = num_image_tokens(model.config, (0, 0))
    assert n == 16 + 1
    ids, mask = rows([[(IMG, n), (IMG, n)]])
    hf_sizes, sizes = torch.tensor([[40, 70], [90, 20]]), torch.zeros(2, 2, dtype=torch.long)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels, image_sizes=hf_sizes, batch_num_images=torch.tensor([2])).logits
        close(model(ids, pixels, sizes), want)
        ref = hf.generate(input_ids=ids, pixel_values=pixels, image_sizes=hf_sizes, batch_num_images=torch.tensor([2]),
                          max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    assert generate(model, ids, pixels, sizes, max_new_tokens=24, eos_token_id=[]).tolist() == ref.tolist()


def test_onevision_video_matches_transformers(onevision):
    hf, model, _ = onevision
    frames = torch.randn(1, 3, 3, TILE, TILE)
    n = num_video_tokens(model.config, 3)
    assert n == 3 * 2 * 2 + 1, "4 x 4 maps pooled to 2 x 2, then one newline"
    ids, mask = rows([[(VID, n)]])
    with torch.no_grad():
        close(model(ids, pixel_values_videos=frames), hf(input_ids=ids, pixel_values_videos=frames).logits)
        ref = hf.generate(input_ids=ids, pixel_values_videos=frames, max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    assert generate(model, ids, pixel_values_videos=frames, max_new_tokens=24, eos_token_id=[]).tolist() == ref.tolist()


def test_pooling_knob_is_onevisions_bilinear_2x2_before_or_after_the_projector(onevision):
    from types import SimpleNamespace
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    hf, model, _ = onevision
    fake = SimpleNamespace(config=hf.config)
    x = torch.randn(5, 16, 32)
    torch.testing.assert_close(pool2x2(x), LlavaOnevisionModel.apply_pooling(fake, x))
    pixels = torch.randn(2, 3, TILE, TILE)
    with torch.no_grad():
        feats = model.vision_tower(pixels, -1, "full")
        after = model.project_images(pixels, pooling="after_projector")
        before = model.project_images(pixels, pooling="before_projector")
        torch.testing.assert_close(after, pool2x2(model.multi_modal_projector(feats)))
        torch.testing.assert_close(before, model.multi_modal_projector(pool2x2(feats)))
    from dataclasses import replace
    for pooling in ("before_projector", "after_projector"):
        model.config = replace(model.config, image_pooling=pooling)
        try:
            pv, sizes, counts = onevision_pixels(model, [(60, 100), (20, 20)])
            sizes[1], counts[1] = torch.tensor([0, 0]), num_image_tokens(model.config, (0, 0))   # a square view
            with torch.no_grad():
                assert [len(f) for f in model.encode_images(pv, sizes)] == counts
                assert counts[1] == 2 * 2 + 1, "a pooled 2 x 2 map and a newline"
        finally:
            model.config = replace(model.config, image_pooling=None)


def test_onevision_pixels_match_transformers_image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    from nanollava.config import LLaVAConfig, VisionConfig
    grid = parse_pinpoints("(1x1),...,(6x6)", 384, "config.json")
    hf = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=grid, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    config = LLaVAConfig(vision=VisionConfig(model_type="siglip_vision_model", image_size=384, patch_size=14),
                         image_aspect_ratio="anyres", image_grid_pinpoints=grid, image_mean=(0.5,) * 3,
                         image_std=(0.5,) * 3, anyres_max=9, vision_feature_select_strategy="full")
    for k, (h, w) in enumerate([(300, 451), (1000, 600), (33, 800)]):
        img = random_image(h, w, k)
        ref = hf(img, return_tensors="pt")
        got, size = image.process(img, config=config)
        assert got.shape == ref["pixel_values"][0].shape and size == tuple(ref["image_sizes"][0].tolist())
        assert (got - ref["pixel_values"][0]).abs().max() <= 1 / (255 * 0.5) + 1e-6
        multi = hf([[img, img]], return_tensors="pt")["pixel_values"][0, 0]       # several images: padded square
        assert (image.process(img, mode="pad", config=config)[0] - multi).abs().max() <= 1 / (255 * 0.5) + 1e-6


def test_onevision_save_pretrained_loads_back_in_transformers(onevision, tmp_path):
    hf, model, _ = onevision
    model.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "llava_onevision"
    back = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path).eval()
    for c in (back.config, back.config.text_config, back.config.vision_config):
        c._attn_implementation = "eager"
    pixels, sizes, counts = onevision_pixels(model, [(60, 100)])
    ids, _ = rows([[(IMG, counts[0])]])
    with torch.no_grad():
        close(back(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits,
              hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits)
    assert LLaVA.from_pretrained(str(tmp_path)).config == model.config


# ----------------------------------------------------------------------------- the original lmms-lab layout

def test_original_onevision_layout_loads_with_its_siglip_minus_one_block(onevision, tmp_path):
    """lmms-lab's LLaVA-OneVision: Qwen2 keys at the top, model.mm_projector.{0,2}, the tuned tower under
    model.vision_tower.vision_tower.* with SigLIP's last block deleted, [w, h] pinpoints, anyres_max_N."""
    from safetensors.torch import load_file, save_file
    hf, model, d = onevision
    state = {}
    for k, v in load_file(os.path.join(d, "model.safetensors")).items():
        name = rename_key(k)
        for src, dst in [("language_model.model.", "model."), ("vision_tower.vision_model.",
                         "model.vision_tower.vision_tower.vision_model."), ("multi_modal_projector.linear_1.",
                         "model.mm_projector.0."), ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                         ("image_newline", "model.image_newline")]:
            if name.startswith(src):
                state[dst + name[len(src):]] = v
    siglip = tmp_path / "siglip"                     # the Hub SigLIP it was built on: one block more
    siglip.mkdir()
    (siglip / "config.json").write_text(json.dumps(dict(tiny_siglip().to_dict(), num_hidden_layers=3)))
    config = dict(tiny_qwen2().to_dict(), architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen",
                  mm_vision_tower="google/siglip-so400m-patch14-384", mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  image_aspect_ratio="anyres_max_2", mm_patch_merge_type="spatial_unpad",
                  image_grid_pinpoints=[[w, h] for h, w in GRID], image_token_index=IMG)
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps(config))
    save_file(state, str(orig / "model.safetensors"))
    loaded = LLaVA.from_pretrained(str(orig), vision_tower=str(siglip))
    c = loaded.config
    assert (c.vision.num_hidden_layers, c.vision_feature_layer, c.vision_feature_select_strategy) == (2, -1, "full")
    assert c.image_grid_pinpoints == GRID and c.anyres_max == 2 and c.template == "qwen_1_5"
    assert c.image_mean == (0.5, 0.5, 0.5), "SigLIP's normalisation, not CLIP's"
    pixels, sizes, counts = onevision_pixels(loaded, [(60, 100), (20, 90)])
    ids, mask = rows([[(IMG, counts[0])], [(IMG, counts[1])]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, position_ids=pos).logits
        close(loaded(ids, pixels, sizes, attention_mask=mask)[mask.bool()], want[mask.bool()])


# ----------------------------------------------------------------------------- several images, training

def test_dataset_gives_several_images_one_padded_view_each_in_an_anyres_model(onevision, tmp_path):
    """A LLaVA-NeXT / OneVision record with "image": [a, b] and one <image> per image: each image becomes one
    padded square view + newline (image_sizes (0, 0)); a one-image record gets its AnyRes tiles."""
    from nanollava.data import LLaVADataset, collate
    from test_conversation import byte_level
    _, model, _ = onevision
    tok = byte_level("qwen_1_5")
    for name, (h, w) in (("a.png", (40, 90)), ("b.png", (70, 30))):
        random_image(h, w, 0).save(tmp_path / name)
    records = [{"id": "multi", "image": ["a.png", "b.png"], "conversations": [
                   {"from": "human", "value": "<image>\nleft <image>\nright what color"}, {"from": "gpt", "value": "red"}]},
               {"id": "single", "image": "a.png", "conversations": [
                   {"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "blue"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    config = model.config.__class__(**{**model.config.__dict__, "image_token_id": tok.image_token_id})
    ds = LLaVADataset(str(tmp_path / "d.json"), str(tmp_path), tok, config, template="qwen_1_5")
    multi, single = ds[0], ds[1]
    assert multi["image_sizes"] == [(0, 0), (0, 0)] and multi["pixel_values"].shape == (2, 1, 3, TILE, TILE)
    assert int((multi["input_ids"] == tok.image_token_id).sum()) == 2 * (16 + 1)
    assert single["image_sizes"] == [(40, 90)] and single["pixel_values"].shape[1] > 1
    batch = collate([multi, single], tok.pad_id)
    assert batch["pixel_values"].shape[0] == 3 and batch["image_sizes"].tolist() == [[0, 0], [0, 0], [40, 90]]


def test_stage2_trains_siglip_qwen2_with_qwen_1_5_and_a_multi_image_record(tmp_path):
    """train.py end to end on SigLIP + Qwen2: stage 1 (plain), then stage 2 with --template qwen_1_5 on
    one-image and two-image records; the export loads as that family, and the multi-image record's
    labels are LLaVA-NeXT's preprocess_qwen masking."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train
    from nanollava.conversation import IGNORE_INDEX
    from nanollava.data import LLaVADataset
    from test_conversation import byte_level, expand, orig_preprocess_qwen
    tok = byte_level("qwen_1_5")
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    torch.manual_seed(0)
    transformers.SiglipVisionModel(tiny_siglip()).save_pretrained(tmp_path / "siglip")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**tiny_qwen2().to_dict(), "vocab_size": len(tok)})
                                  ).save_pretrained(tmp_path / "qwen")
    (tmp_path / "images").mkdir()
    for k in range(3):
        random_image(30 + 10 * k, 50, k).save(tmp_path / "images" / f"{k}.png")
    captions = [{"id": str(k), "image": f"{k}.png", "conversations": [
        {"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "a red circle"}]} for k in range(2)]
    multi = {"id": "m", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nwhat color is the shape"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "is it a circle"}, {"from": "gpt", "value": "yes"}]}
    single = {"id": "s", "image": "2.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat shape"}, {"from": "gpt", "value": "a circle"}]}
    (tmp_path / "s1.json").write_text(json.dumps(captions))
    (tmp_path / "s2.json").write_text(json.dumps([multi, single]))
    common = ["--vision-tower", str(tmp_path / "siglip"), "--llm", str(tmp_path / "qwen"), "--tokenizer",
              str(tmp_path / "tokenizer.json"), "--image-folder", str(tmp_path / "images"), "--global-batch", "2",
              "--micro-batch", "1", "--device", "cpu", "--max-steps", "1", "--lr", "1e-2"]
    train.main(["--stage", "1", "--data", str(tmp_path / "s1.json"), "--out", str(tmp_path / "o1"), *common])
    train.main(["--stage", "2", "--data", str(tmp_path / "s2.json"), "--out", str(tmp_path / "o2"),
                "--stage1-out", str(tmp_path / "o1"), "--template", "qwen_1_5", "--image-mode", "anyres", *common])
    model = LLaVA.from_pretrained(str(tmp_path / "o2" / "final"))
    c = model.config
    assert (c.vision.model_type, c.text.qkv_bias, c.template, c.image_aspect_ratio) == \
        ("siglip_vision_model", True, "qwen_1_5", "anyres")
    assert c.image_mean == (0.5, 0.5, 0.5), "SigLIP's normalisation travels into the export"
    before = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen").model.layers[0].mlp.up_proj.weight
    assert not torch.equal(model.language_model.model.layers[0].mlp.up_proj.weight, before), "stage 2 trains the LLM"
    ds = LLaVADataset(str(tmp_path / "s2.json"), str(tmp_path / "images"), tok, c, template="qwen_1_5")
    sample = ds[0]
    n = num_image_tokens(c, (0, 0))
    ids, labels = expand(*orig_preprocess_qwen(multi["conversations"], tok)[:2], tok.image_token_id, n)
    assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
    assert sum(lab != IGNORE_INDEX for lab in labels) > 0 and sample["image_sizes"] == [(0, 0), (0, 0)]


def test_sample_and_eval_take_several_images(onevision, tmp_path, capsys):
    """sample.py --image a --image b and an eval question whose "image" is a list, on a OneVision model."""
    import sys
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import eval as eval_script
    import sample
    _, _, d = onevision
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "You", "are", "a", "helpful", "assistant.",
             "user", "assistant", "what", "differs"]
    t = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    t.save(str(tmp_path / "tokenizer.json"))                 # no <image>: the model's id is used
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    for name, (h, w) in (("a.png", (40, 90)), ("b.png", (70, 30))):
        random_image(h, w, 3).save(tmp_path / name)
    common = ["--model", d, "--tokenizer", str(tmp_path / "tokenizer.json"), "--template", "qwen_1_5",
              "--max-new-tokens", "3"]
    sample.cli([*common, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png"), "--prompt",
                "what differs", "--verbose"])
    assert "prompt tokens" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": ["a.png", "b.png"], "text": "what differs"})
                                      + "\n" + json.dumps({"question_id": 2, "image": "a.png", "text": "what"}) + "\n")
    eval_script.cli([*common, "--questions", str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path),
                     "--answers", str(tmp_path / "ans.jsonl"), "--batch-size", "2"])
    answers = [json.loads(line) for line in open(tmp_path / "ans.jsonl")]
    assert len(answers) == 2 and not any("error" in a for a in answers), answers
