"""Checkpoint loading/saving: every key layout gives the same logits as transformers' Llava.

The oracle is `transformers.LlavaForConditionalGeneration` with random weights. A checkpoint
is written by transformers itself (plain, sharded), or re-keyed by these tests into the other
layouts met in the wild (newer llava-hf, original haotian-liu LLaVA with a separate CLIP
directory, .bin files), loaded with `LLaVA.from_pretrained`, and compared logit by logit.
"""
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

from nanollava import checkpoint  # noqa: E402
from nanollava.llava import LLaVA  # noqa: E402

transformers.logging.set_verbosity_error()
if hasattr(transformers.utils.logging, "disable_progress_bar"):
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- the HF oracle

def hf_llava(seed=0, vision_layers=2, vision_hidden=16, vision_heads=2, image_size=16, patch_size=8,
             text_layers=2, text_hidden=16, heads=4, kv_heads=2, head_dim=None, vocab=64, rope_theta=10000.0,
             tied=False, attention_bias=False, feature_layer=-2, strategy="default", projector="mlp2x_gelu"):
    """A random-weight transformers LlavaForConditionalGeneration (eager attention, float32).

    HF has no linear projector: for "linear" its projector is linear_1 -> identity act ->
    linear_2 = I, which computes exactly linear_1; `linearise` then drops linear_2 from the files.
    """
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                          num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                          image_size=image_size, patch_size=patch_size, projection_dim=8)
    tc = LlamaConfig(vocab_size=vocab, hidden_size=text_hidden, intermediate_size=2 * text_hidden + 8,
                     num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, rope_theta=rope_theta, tie_word_embeddings=tied,
                     attention_bias=attention_bias, rms_norm_eps=1e-5, pad_token_id=0)
    config = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=vocab - 1,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="linear" if projector == "linear" else "gelu",
                         tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():                 # non-trivial biases and norm weights too
            p.add_(0.1 * torch.randn_like(p))
        if projector == "linear":
            proj = model.model.multi_modal_projector.linear_2
            proj.weight.copy_(torch.eye(text_hidden))
            proj.bias.zero_()
    if tied:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model


def image_tokens(hf):
    c = hf.config
    n = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    return n + (c.vision_feature_select_strategy == "full")


def random_inputs(hf, images_per_sample, pads, left_padding, text_len=5, seed=0):
    """HF-style batch: each image is a run of image_token_id; padding left or right."""
    g = torch.Generator().manual_seed(seed)
    c = hf.config
    n_tok, image_id = image_tokens(hf), c.image_token_id
    rows = []
    for n_img, pad in zip(images_per_sample, pads):
        ids = torch.randint(1, image_id, (text_len,), generator=g).tolist()
        for _ in range(n_img):
            at = int(torch.randint(0, len(ids) + 1, (1,), generator=g))
            ids[at:at] = [image_id] * n_tok
        rows.append((ids, pad))
    T = max(len(ids) + pad for ids, pad in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (ids, _) in enumerate(rows):
        at = T - len(ids) if left_padding else 0
        input_ids[b, at:at + len(ids)] = torch.tensor(ids)
        mask[b, at:at + len(ids)] = 1
    n_images = sum(images_per_sample)
    s = c.vision_config.image_size
    pixels = torch.randn(n_images, 3, s, s, generator=g) if n_images else None
    return input_ids, mask, pixels


def hf_logits(hf, input_ids, mask, pixels):
    """HF logits with nanollava's default positions (mask.cumsum - 1, clamped at 0)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                  position_ids=position_ids).logits


def assert_same_logits(model, hf, inputs, expected=None):
    input_ids, mask, pixels = inputs
    expected = hf_logits(hf, *inputs) if expected is None else expected
    with torch.no_grad():
        got = model(input_ids, pixel_values=pixels, attention_mask=mask)
    real = mask.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    tol = 1e-4 * max(1.0, expected[real].abs().max().item())
    assert diff <= tol, f"logits differ from transformers by {diff:.3g} (tolerance {tol:.3g})"


# ----------------------------------------------------------------------------- re-keying helpers

def nanollava_state(directory):
    """The tensors of a checkpoint directory under nanollava (= llava-hf Hub) names."""
    state = {}
    for path in checkpoint.weight_files(directory):
        for key, t in checkpoint.iter_tensors(path):
            name = checkpoint.rename_key(key)
            if name:
                state[name] = t
    return state


def write_dir(directory, config, state, fmt="safetensors"):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
    else:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))


def linearise(directory, projector):
    """Turn an HF-saved identity-linear_2 checkpoint into a real "linear"-projector checkpoint."""
    if projector != "linear":
        return
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config.update(projector_type="linear", projector_hidden_act="gelu")
    state = {k: v for k, v in nanollava_state(directory).items() if "linear_2" not in k}
    for name in os.listdir(directory):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
            os.remove(os.path.join(directory, name))
    write_dir(directory, config, state)


def save_hf(hf, directory, projector, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.save_pretrained(directory, **kw)
    linearise(directory, projector)


NEW_LAYOUT = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.vision_model.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector.")]


def rekey(state, table):
    out = {}
    for k, v in state.items():
        for src, dst in table:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out[k] = v
    return out


def write_original(hf, directory, clip_dir, projector, clip_kind="vision", config_points_to_clip=True,
                   fmt="safetensors"):
    """An original (haotian-liu) LLaVA checkpoint: Vicuna keys + model.mm_projector, CLIP elsewhere."""
    src = directory + "_hf"
    save_hf(hf, src, projector)
    state = nanollava_state(src)
    c = hf.config
    projector_keys = ([("multi_modal_projector.linear_1.", "model.mm_projector.")] if projector == "linear" else
                      [("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                       ("multi_modal_projector.linear_2.", "model.mm_projector.2.")])
    llm = rekey({k: v for k, v in state.items() if not k.startswith("vision_tower.")},
                [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")] + projector_keys)
    llm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)   # old Llama files carry it
    config = c.text_config.to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                  mm_vision_tower=clip_dir if config_points_to_clip else "openai/clip-vit-large-patch14-336",
                  mm_projector_type=projector, mm_vision_select_layer=c.vision_feature_layer,
                  mm_vision_select_feature="patch" if c.vision_feature_select_strategy == "default" else "cls_patch",
                  mm_hidden_size=c.vision_config.hidden_size, image_aspect_ratio="pad",
                  mm_patch_merge_type="flat", tie_word_embeddings=c.text_config.tie_word_embeddings,
                  # the original splices -200 placeholders; without this key nanollava expands
                  # images into id vocab_size, which the HF oracle's embedding table cannot look up
                  image_token_index=c.image_token_id)
    write_dir(directory, config, llm, fmt)
    vision = {k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")}
    vision["vision_model.embeddings.position_ids"] = torch.arange(4)[None]   # old CLIP files carry it
    if clip_kind == "full":        # a whole CLIPModel: the text tower must be ignored
        vision["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
        vision.update({"text_projection.weight": torch.zeros(8, 8), "visual_projection.weight": torch.zeros(8, 8),
                       "logit_scale": torch.tensor(2.0)})
        clip_config = {"model_type": "clip", "vision_config": c.vision_config.to_dict(),
                       "text_config": {"hidden_size": 8}}
    else:
        clip_config = c.vision_config.to_dict()
    write_dir(clip_dir, clip_config, vision, fmt)
    shutil.rmtree(src)


# ----------------------------------------------------------------------------- property test

@st.composite
def llava_cases(draw):
    vision_heads = draw(st.sampled_from([1, 2, 4]))
    vision_layers = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([2, 4]))
    patch = draw(st.sampled_from([4, 8]))
    cfg = dict(
        seed=draw(st.integers(0, 2**16)),
        vision_layers=vision_layers, vision_heads=vision_heads, vision_hidden=vision_heads * 8,
        patch_size=patch, image_size=patch * draw(st.integers(1, 3)),
        text_layers=draw(st.integers(1, 2)), heads=heads,
        kv_heads=heads // draw(st.sampled_from([1, 2])),         # MHA or GQA
        text_hidden=heads * draw(st.sampled_from([4, 8])),
        head_dim=draw(st.sampled_from([None, None, 8])),
        vocab=draw(st.integers(40, 90)),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        tied=draw(st.booleans()), attention_bias=draw(st.booleans()),
        # not 0 / -L-1 (the embeddings): transformers 5.23 reads layer 0 as "no hidden states"
        feature_layer=draw(st.sampled_from([i for i in range(-vision_layers, vision_layers + 1) if i])),
        strategy=draw(st.sampled_from(["default", "full"])),
        projector=draw(st.sampled_from(["mlp2x_gelu", "linear"])),
    )
    batch = draw(st.integers(1, 3))
    inputs = dict(images_per_sample=draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)),
                  pads=draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)),
                  left_padding=draw(st.booleans()))
    sharded = draw(st.booleans())
    return cfg, inputs, sharded


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=llava_cases())
def test_from_pretrained_matches_transformers_logits(case, tmp_path_factory):
    cfg, inputs, sharded = case
    hf = hf_llava(**cfg)
    directory = str(tmp_path_factory.mktemp("hf"))
    save_hf(hf, directory, cfg["projector"], max_shard_size="2KB" if sharded else None)
    if sharded and cfg["projector"] != "linear":
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    model = LLaVA.from_pretrained(directory, dtype=torch.float32)
    assert_same_logits(model, hf, random_inputs(hf, seed=cfg["seed"], **inputs))


# ----------------------------------------------------------------------------- fixed-config layouts

CASES = {"mlp_tied": dict(seed=1, projector="mlp2x_gelu", tied=True, attention_bias=True),
         "linear": dict(seed=2, projector="linear", strategy="full", feature_layer=-1)}


@pytest.fixture(scope="module", params=list(CASES))
def oracle(request):
    """(HF model, its projector type, a padded batch with images, HF's logits for it)."""
    cfg = CASES[request.param]
    hf = hf_llava(**cfg)
    inputs = random_inputs(hf, images_per_sample=[1, 0, 2], pads=[0, 2, 1], left_padding=True)
    return hf, cfg["projector"], inputs, hf_logits(hf, *inputs)


def test_save_pretrained_loads_in_transformers_without_missing_keys(oracle, tmp_path):
    hf, projector, inputs, expected = oracle
    save_hf(hf, str(tmp_path / "hf"), projector)
    model = LLaVA.from_pretrained(str(tmp_path / "hf"))
    for shard in (None, "3KB"):
        out = tmp_path / f"nano_{shard}"
        checkpoint.save(model, str(out), max_shard_size=shard)
        assert (out / "model.safetensors.index.json").exists() == (shard is not None)
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
        keys = set(checkpoint.checkpoint_keys(str(out)))
        assert "vision_tower.vision_model.pre_layrnorm.weight" in keys, "not the llava-hf Hub layout"
        assert ("language_model.lm_head.weight" in keys) != hf.config.text_config.tie_word_embeddings
        assert_same_logits(LLaVA.from_pretrained(str(out)), hf, inputs, expected)
        if projector == "linear":
            continue       # transformers has no linear projector: it would want linear_2
        reloaded, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        reloaded.config._attn_implementation = "eager"
        for sub in (reloaded.config.text_config, reloaded.config.vision_config):
            sub._attn_implementation = "eager"
        assert_same_logits(model, reloaded.eval(), inputs, expected)
    # overwrite the directory the (memory-mapped) weights were loaded from: still consistent,
    # and a sharded save over a single-file one (and back) leaves no stale weight files
    model = LLaVA.from_pretrained(str(out))
    model.save_pretrained(str(out))
    assert sorted(n for n in os.listdir(out) if "model" in n) == ["model.safetensors"]
    assert_same_logits(LLaVA.from_pretrained(str(out)), hf, inputs, expected)
    checkpoint.save(model, str(out), max_shard_size="3KB")
    assert "model.safetensors" not in os.listdir(out)
    assert_same_logits(LLaVA.from_pretrained(str(out)), hf, inputs, expected)
    assert_same_logits(model, hf, inputs, expected)


@pytest.mark.parametrize("vision_prefix", ["model.vision_tower.", "model.vision_tower.vision_model."])
def test_new_llava_hf_key_layout_loads(oracle, tmp_path, vision_prefix):
    hf, projector, inputs, expected = oracle
    save_hf(hf, str(tmp_path / "hf"), projector)
    state = rekey(nanollava_state(str(tmp_path / "hf")),
                  [(s, d) if s != "vision_tower.vision_model." else (s, vision_prefix) for s, d in NEW_LAYOUT])
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    fmt = "bin" if vision_prefix.endswith("vision_model.") else "safetensors"
    write_dir(str(tmp_path / "new"), config, state, fmt=fmt)
    assert_same_logits(LLaVA.from_pretrained(str(tmp_path / "new")), hf, inputs, expected)


def test_sharded_bin_with_index_loads_in_bfloat16(oracle, tmp_path):
    hf, projector, inputs, expected = oracle
    save_hf(hf, str(tmp_path / "hf"), projector)
    state = nanollava_state(str(tmp_path / "hf"))
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", out / "config.json")
    for fname, keys in shards.items():
        torch.save({k: state[k] for k in keys}, out / fname)
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    assert_same_logits(LLaVA.from_pretrained(str(out)), hf, inputs, expected)
    half = LLaVA.from_pretrained(str(out), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    w = half.language_model.model.embed_tokens.weight
    assert torch.equal(w, state["language_model.model.embed_tokens.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("clip_kind,by_argument,fmt", [("vision", False, "safetensors"), ("full", True, "bin")])
def test_original_llava_layout_with_separate_clip_loads(oracle, tmp_path, clip_kind, by_argument, fmt):
    hf, projector, inputs, expected = oracle
    clip_dir = str(tmp_path / "clip")
    write_original(hf, str(tmp_path / "orig"), clip_dir, projector, clip_kind,
                   config_points_to_clip=not by_argument, fmt=fmt)
    if by_argument:
        with pytest.raises(FileNotFoundError, match="vision_tower="):
            LLaVA.from_pretrained(str(tmp_path / "orig"))
    model = LLaVA.from_pretrained(str(tmp_path / "orig"), vision_tower=clip_dir if by_argument else None)
    assert model.config.projector_type == projector
    assert_same_logits(model, hf, inputs, expected)


def test_original_llava16_layout_carries_its_vision_tower(tmp_path):
    """LLaVA-1.6 originals: the tuned tower is inside, under model.vision_tower.vision_tower.vision_model.*"""
    hf = hf_llava(seed=3)
    inputs = random_inputs(hf, images_per_sample=[2], pads=[0], left_padding=False)
    clip_dir = tmp_path / "clip"
    write_original(hf, str(tmp_path / "orig"), str(clip_dir), "mlp2x_gelu")
    state = rekey(nanollava_state(str(tmp_path / "orig")),
                  [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                   ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                   ("multi_modal_projector.linear_2.", "model.mm_projector.2.")])
    tower = load_file(str(clip_dir / "model.safetensors"))
    state.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    with open(tmp_path / "orig" / "config.json") as f:
        config = json.load(f)
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"    # a Hub id, not a local directory
    write_dir(str(tmp_path / "v16"), config, state)
    # no local CLIP config: the tower is assumed ViT-L/14-336, and mm_hidden_size says it is not
    with pytest.raises(ValueError, match=r"config.json: mm_hidden_size = 16 but the vision tower's hidden_size is 1024: pass vision_tower="):
        LLaVA.from_pretrained(str(tmp_path / "v16"))
    # a CLIP directory gives the tower's shape only: the weights inside the checkpoint win
    save_file({k: torch.zeros_like(v) for k, v in tower.items()}, str(clip_dir / "model.safetensors"))
    model = LLaVA.from_pretrained(str(tmp_path / "v16"), vision_tower=str(clip_dir))
    assert_same_logits(model, hf, inputs)


# ----------------------------------------------------------------------------- parts (training start)

def test_clip_and_llama_directories_load_through_the_same_path(tmp_path):
    """load_llava_from_parts: CLIP dir + Llama dir + original mm_projector.bin == HF Llava."""
    hf = hf_llava(seed=4)
    c = hf.config
    clip = CLIPVisionModel(c.vision_config).eval()
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(str(tmp_path / "clip"))
    llama = LlamaForCausalLM(c.text_config).eval()
    llama.model.load_state_dict(hf.model.language_model.state_dict())
    llama.lm_head.load_state_dict(hf.lm_head.state_dict())
    llama.save_pretrained(str(tmp_path / "llama"))
    proj = hf.model.multi_modal_projector
    torch.save({"model.mm_projector.0.weight": proj.linear_1.weight.detach().clone(),
                "model.mm_projector.0.bias": proj.linear_1.bias.detach().clone(),
                "model.mm_projector.2.weight": proj.linear_2.weight.detach().clone(),
                "model.mm_projector.2.bias": proj.linear_2.bias.detach().clone()}, tmp_path / "mm_projector.bin")

    model = checkpoint.load_from_parts(str(tmp_path / "clip"), str(tmp_path / "llama"),
                                             projector=str(tmp_path / "mm_projector.bin"),
                                             image_token_id=c.image_token_id)
    assert_same_logits(model, hf, random_inputs(hf, images_per_sample=[1, 2], pads=[1, 0], left_padding=True))

    # without a projector: a fresh one (finite, trainable), the rest still loaded
    fresh = checkpoint.load_from_parts(str(tmp_path / "clip"), str(tmp_path / "llama"),
                                             projector_type="linear", image_token_id=c.image_token_id)
    w = fresh.multi_modal_projector.linear_1.weight
    assert not w.is_meta and torch.isfinite(w).all() and w.abs().sum() > 0
    text_only = random_inputs(hf, images_per_sample=[0], pads=[0], left_padding=False)
    assert_same_logits(fresh, hf, text_only)

    # nanollava's own projector file round-trips
    checkpoint.save_projector(model, str(tmp_path / "mm_projector.safetensors"))
    state = checkpoint.load_projector(str(tmp_path / "mm_projector.safetensors"))
    assert torch.equal(state["linear_2.weight"], proj.linear_2.weight.detach())

    # a full CLIPModel directory works as the tower too (text tower ignored)
    full = CLIPModel(CLIPConfig(vision_config=c.vision_config.to_dict(), projection_dim=8,
                                text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=50,
                                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    full.vision_model.load_state_dict(hf.model.vision_tower.vision_model.state_dict()
                                      if hasattr(hf.model.vision_tower, "vision_model")
                                      else hf.model.vision_tower.state_dict())
    full.save_pretrained(str(tmp_path / "clipfull"))
    model = checkpoint.load_from_parts(str(tmp_path / "clipfull"), str(tmp_path / "llama"),
                                             projector=str(tmp_path), image_token_id=c.image_token_id)
    assert_same_logits(model, hf, random_inputs(hf, images_per_sample=[1], pads=[0], left_padding=False))


# ----------------------------------------------------------------------------- bad checkpoints

@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    hf_llava(seed=5).save_pretrained(str(directory))
    return directory


def copy_with(good_dir, tmp_path, edit):
    state = nanollava_state(str(good_dir))
    edit(state)
    with open(good_dir / "config.json") as f:
        config = json.load(f)
    write_dir(str(tmp_path / "bad"), config, state)
    return str(tmp_path / "bad")


def test_missing_key_is_named(good_dir, tmp_path):
    bad = copy_with(good_dir, tmp_path, lambda s: s.pop("language_model.model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): language_model.model.norm.weight"):
        LLaVA.from_pretrained(bad)


def test_wrong_shape_names_file_key_and_both_shapes(good_dir, tmp_path):
    def grow(s):
        s["language_model.model.embed_tokens.weight"] = torch.zeros(100, 16)
        s["extra.weight"] = torch.zeros(1)
    bad = copy_with(good_dir, tmp_path, grow)
    with pytest.raises(ValueError) as e:
        LLaVA.from_pretrained(bad)
    msg = str(e.value)
    assert ("bad/model.safetensors: language_model.model.embed_tokens.weight has shape (100, 16) in the "
            "checkpoint but the model expects (64, 16)") in msg, msg
    assert "unexpected key extra.weight" in msg, msg       # all problems in ONE error


def test_empty_folder_says_it_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        LLaVA.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_llava().config.to_dict()))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory .no model.safetensors"):
        LLaVA.from_pretrained(str(tmp_path))


def test_truncated_safetensors_names_the_file(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "cut")
    path = tmp_path / "cut" / "model.safetensors"
    data = path.read_bytes()
    for size in (len(data) // 2, 5):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"cut/model.safetensors: cannot read safetensors file"):
            LLaVA.from_pretrained(str(tmp_path / "cut"))
    (tmp_path / "cut" / "model.safetensors").unlink()
    (tmp_path / "cut" / "pytorch_model.bin").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot read PyTorch weights"):
        LLaVA.from_pretrained(str(tmp_path / "cut"))
