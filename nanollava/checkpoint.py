"""The loading boundary: every LLaVA checkpoint in the wild -> the canonical model, and back to llava-hf.

Loading is three steps, each driven by a table below:
  1. config.json -> LLaVAConfig. A key whose value changes the math and that nanollava does not
     implement is refused with the file, the key and the value (IMPLEMENTED); the original code's
     config dialect and AnyRes pinpoint order are translated (read_original_config).
  2. the conversation template, from the checkpoint's own files (TEMPLATE_SIGNS, ORIGINAL_TEMPLATES).
  3. the weights: the model is built on the meta device (no memory), every tensor is renamed
     (KEY_RENAMES), checked (shape, dtype, finite) and cast as it is read, and the whole set is
     assigned with load_state_dict(assign=True): one copy of the weights, never two.

Layouts read: llava-hf LLaVA-1.5 / NeXT in the old Hub layout (`language_model.model.*`) and the
newer one (`model.language_model.*`, `lm_head.*`; transformers 5 also drops `vision_model.`);
the original LLaVA (haotian-liu) and LLaVA-NeXT layouts (Vicuna keys + `model.mm_projector.*`,
vision weights from a separate CLIP directory, or, for 1.6, `model.vision_tower.vision_tower.*`);
CLIP and Llama/Vicuna directories (load_from_parts, what training starts from); nanollava's own
checkpoints (= the llava-hf old layout, plus nanollava's keys in config.json). Single or sharded
safetensors, or `.bin` read with weights_only=True (never unpickled). The model never learns which
file it came from.
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanollava import anyres
from nanollava.config import CLIP_MEAN, CLIP_STD, LLaVAConfig, TextConfig, VisionConfig
from nanollava.conversation import TEMPLATES
from nanollava.files import read_json
from nanollava.llava import PROJECTOR_TYPES, VISION_TOWERS, LLaVA, pinpoints

# ----------------------------------------------------------------------------- tables

# (checkpoint key prefix, nanollava key prefix): the first matching row wins; None = not used by LLaVA.
KEY_RENAMES = [
    # llava-hf, newer transformers layout (model.language_model.*, lm_head.*)
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),  # original LLaVA-1.6
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),         # transformers 5: no vision_model.
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    # original LLaVA projector: nn.Sequential(Linear, GELU, Linear) or a single Linear
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_projector.", "multi_modal_projector.linear_1."),
    # Llama / Vicuna (also the language half of original LLaVA)
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    # llava-hf old (Hub) layout = nanollava's own
    ("language_model.", "language_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),               # transformers 5 save_pretrained
    # CLIP: CLIPModel keeps vision_model.*; transformers 5 CLIPVisionModel saves bare keys
    ("vision_model.", "vision_tower.vision_model."),
    ("embeddings.", "vision_tower.vision_model.embeddings."),
    ("encoder.", "vision_tower.vision_model.encoder."),
    ("pre_layrnorm.", "vision_tower.vision_model.pre_layrnorm."),
    ("post_layernorm.", "vision_tower.vision_model.post_layernorm."),
    ("text_model.", None), ("text_projection.", None), ("visual_projection.", None), ("logit_scale", None),
]
# Buffers some checkpoints carry that LLaVA recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
# Parts LLaVA never runs: SigLIP's attention-pooling head (the original code replaces it with Identity).
UNUSED_PREFIXES = ("vision_tower.vision_model.head.",)

# The original code's model_type -> the HF model_type of its LLM.
ORIGINAL_TEXT_MODEL = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}

# Per vision tower: transformers' class defaults for absent config keys; its image processor's
# normalisation and image mode (processor_mode: the original code's "square", stage 1's); the image
# mode a llava-hf checkpoint without nanollava's keys is run with (CLIP: LLaVA-1.5's pad); and the
# features a new LLaVA takes from it (load_from_parts): CLIP's layer -2 without CLS (LLaVA-1.5),
# SigLIP's layer -2 with every token (LLaVA-NeXT deletes the last block and keeps all 729).
VISION_TOWER_DEFAULTS = {
    "clip_vision_model": dict(config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, image_size=224, patch_size=32),
                              image_mean=CLIP_MEAN, image_std=CLIP_STD, processor_mode="crop", image_mode="pad",
                              features=dict(vision_feature_layer=-2, vision_feature_select_strategy="default")),
    "siglip_vision_model": dict(config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, image_size=224, patch_size=16,
                                            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
                                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), processor_mode="squash",
                                image_mode="squash",
                                features=dict(vision_feature_layer=-2, vision_feature_select_strategy="full")),
}
# Towers an original LLaVA config names by Hub id (mm_vision_tower) and carries the weights of, when no
# local copy of the tower's own config is given: the shapes of those weights.
KNOWN_TOWERS = {
    "clip-vit-large-patch14-336": dict(model_type="clip_vision_model"),                 # VisionConfig's defaults
    "siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                      num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}

# Config keys whose value changes the math: (key, value when absent, values nanollava implements).
# Any other value is refused, naming the file, the key and the value. The text model_type row is how
# a LLaVA built on another LLM (Gemma, Granite, Phi, ...) is refused instead of loading silently wrong.
IMPLEMENTED = {
    "text": [("model_type", "llama", ("llama", "mistral", "qwen2")),
             ("hidden_act", "silu", ("silu",)),
             ("mlp_bias", False, (False,))],
    "vision": [("model_type", "clip_vision_model", tuple(VISION_TOWERS)),
               ("hidden_act", "quick_gelu", ("quick_gelu", "gelu", "gelu_pytorch_tanh"))],
    "llava": [("model_type", "llava", ("llava", "llava_next", "llava_onevision")),
              ("projector_hidden_act", "gelu", ("gelu",)),
              ("multimodal_projector_bias", True, (True,)),
              ("projector_type", "mlp2x_gelu", PROJECTOR_TYPES),
              ("vision_feature_select_strategy", "default", ("default", "full"))],
    "original": [("model_type", "llava", tuple(ORIGINAL_TEXT_MODEL)),
                 ("mm_use_im_start_end", False, (False,)),
                 ("mm_projector_type", "linear", PROJECTOR_TYPES),
                 ("mm_vision_select_feature", "patch", ("patch", "cls_patch")),
                 ("mm_patch_merge_type", "flat", ("flat", "spatial_unpad")),
                 ("mm_resampler_type", None, (None,))],
}

# The conversation template, from the checkpoint's own files. First the chat template (or, failing
# that, the special tokens) its tokenizer files carry, first sign found wins, (sign, the LLM it needs,
# template); then the original code's model_type. A checkpoint that shows none has no template:
# sample.py and eval.py ask for --template.
TEMPLATE_SIGNS = [
    ("<|start_header_id|>", None, "llava_llama_3"),   # the Llama-3 chat format: llama3-llava-next-8b
    ("<|im_start|>", "qwen2", "qwen_1_5"),            # Qwen's chatml: OneVision, Interleave
    ("<|im_start|>", None, "chatml_direct"),          # Yi-34B's chatml: llava-v1.6-34b
    ("[INST]", None, "mistral_instruct"),             # llava-v1.6-mistral-7b
    ("ASSISTANT:", None, "vicuna_v1"),                # "USER: ... ASSISTANT:": llava-1.5, llava-v1.6-vicuna
]
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "tokenizer.json")
# (model_type, vocabulary size or None for any): an original LLaVA with a LLaMA-2-vocabulary LLM is Vicuna
# (LLaVA-1.5, v1.6-vicuna: conv mode vicuna_v1); LLaVA-OneVision's Qwen2 is qwen_1_5.
ORIGINAL_TEMPLATES = {("llava", 32000): "vicuna_v1", ("llava_llama", 32000): "vicuna_v1",
                      ("llava_mistral", 32000): "mistral_instruct", ("llava_qwen", None): "qwen_1_5"}

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PROJECTOR_NAMES = ("mm_projector.safetensors", "mm_projector.bin")
MAX_LISTED = 20          # an error lists at most this many problems


def rename_key(key):
    """Checkpoint key -> nanollava key (None: a key LLaVA ignores, "": a key nothing maps)."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    for src, dst in KEY_RENAMES:
        if key.startswith(src):
            name = None if dst is None else dst + key[len(src):]
            return None if name is None or name.startswith(UNUSED_PREFIXES) else name
    return ""


# ----------------------------------------------------------------------------- reading files

def weight_files(directory):
    """The weight files of a checkpoint directory: single file or the shards an index names."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    for name in INDEX_NAMES:
        index = os.path.join(directory, name)
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: has no 'weight_map'")
            files = [os.path.join(directory, f) for f in dict.fromkeys(weight_map.values())]
            absent = [f for f in files if not os.path.exists(f)]
            if absent:
                raise FileNotFoundError(f"{index}: names shard(s) that do not exist: {', '.join(absent)}")
            return files
    for name in WEIGHT_NAMES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return [path]
    raise FileNotFoundError(f"{directory}: not a checkpoint directory (no {', '.join(WEIGHT_NAMES + INDEX_NAMES)})")


def iter_tensors(path):
    """Yield (key, tensor) from one .safetensors or .bin file, one tensor at a time, on CPU."""
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{path}: cannot read safetensors file, truncated or corrupt? ({e})") from None
        return
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)   # legacy (pre-zip) format
    except Exception as e:  # pickle / zip errors: a truncated download, a tampered file, not a checkpoint
        raise ValueError(f"{path}: cannot read PyTorch weights file, truncated, tampered or corrupt? ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for key in list(state):
        yield key, state.pop(key)                # free each source tensor once handed over


def checkpoint_keys(directory):
    """All tensor names of a checkpoint directory (safetensors: from the headers alone)."""
    keys = []
    for path in weight_files(directory):
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    keys += list(f.keys())
            except SafetensorError as e:
                raise ValueError(f"{path}: cannot read safetensors file, truncated or corrupt? ({e})") from None
        else:
            keys += [k for k, _ in iter_tensors(path)]
    return keys


# ----------------------------------------------------------------------------- configs

def check_implemented(d, section, where):
    """Refuse the first key of `d` whose value is not one nanollava implements (IMPLEMENTED[section])."""
    for key, default, allowed in IMPLEMENTED[section]:
        value = d.get(key, default)
        if value not in allowed:
            raise ValueError(f"{where}: {key} = {value!r} is not implemented by nanollava "
                             f"(implemented: {', '.join(map(repr, allowed))})")


def _fields(cls, d, defaults=None):
    """The keys of `d` (over `defaults`) that are fields of the dataclass `cls`."""
    names = cls.__dataclass_fields__
    return {k: v for k, v in {**(defaults or {}), **d}.items() if k in names}


def read_text_config(d, where):
    """TextConfig from a Llama / Mistral / Qwen2 config.json (or a llava text_config) dict; absent keys
    take LlamaConfig's class defaults, as transformers does for a llava text_config."""
    check_implemented(d, "text", where)
    model_type = d.get("model_type", "llama")
    for rope in (d.get("rope_scaling") or {}, d.get("rope_parameters") or {}):   # old and new HF spelling
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{where}: rope_scaling type = {rope_type!r} is not implemented by nanollava "
                             "(only plain RoPE)")
    kw = _fields(TextConfig, d, dict(max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=None,
                                     num_key_value_heads=None))
    kw["rope_theta"] = float((d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0)))
    kw["qkv_bias"] = model_type == "qwen2"
    # Mistral attends over a sliding window (MistralConfig's default 4096); Qwen2 only with use_sliding_window
    kw["sliding_window"] = {"mistral": d.get("sliding_window", 4096),
                            "qwen2": d.get("sliding_window") if d.get("use_sliding_window") else None}.get(model_type)
    return TextConfig(**kw)


def read_vision_config(d, where):
    """VisionConfig from a CLIP / SigLIP config.json (a vision model, a whole CLIPModel or SiglipModel, or a
    llava vision_config); absent keys take the tower's HF class defaults, as transformers does."""
    if d.get("model_type") in ("clip", "siglip") or "vision_config" in d:
        d = dict(d.get("vision_config") or {}, model_type=d.get("model_type", "clip") + "_vision_model")
    check_implemented(d, "vision", where)
    model_type = d.get("model_type", "clip_vision_model")
    return VisionConfig(**_fields(VisionConfig, {**d, "model_type": model_type},
                                  VISION_TOWER_DEFAULTS[model_type]["config"]))


def read_image_processing(directory, vision, default_mode):
    """(image mode, mean, std): the tower's defaults, with the mean and std of a preprocessor_config.json."""
    tower = VISION_TOWER_DEFAULTS[vision.model_type]
    mean, std = tower["image_mean"], tower["image_std"]
    path = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(path):
        p = read_json(path)
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return default_mode or tower["image_mode"], mean, std


def read_llava_hf_config(d, where):
    """LLaVAConfig from a llava-hf (`llava`, `llava_next`, `llava_onevision`) or nanollava config.json dict."""
    check_implemented(d, "llava", where)
    vision = VisionConfig() if d.get("vision_config") is None else read_vision_config(d["vision_config"], where)
    text = read_text_config(d.get("text_config") or {}, where)
    text.tie_word_embeddings = bool(text.tie_word_embeddings or d.get("tie_word_embeddings"))  # transformers ties on either
    anyres_mode = d.get("model_type") in ("llava_next", "llava_onevision")
    m = re.fullmatch(r"anyres_max_(\d+)", d.get("vision_aspect_ratio", ""))   # OneVision: anyres_max_9
    mode, mean, std = read_image_processing(os.path.dirname(where), vision, d.get("image_aspect_ratio") or
                                            ("anyres" if anyres_mode else None))
    return LLaVAConfig(
        vision=vision, text=text, projector_type=d.get("projector_type", "mlp2x_gelu"),
        vision_feature_layer=d.get("vision_feature_layer", -2),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        video_token_id=d.get("video_token_index", d.get("video_token_id")),
        image_aspect_ratio=mode, image_mean=tuple(d.get("image_mean", mean)), image_std=tuple(d.get("image_std", std)),
        image_grid_pinpoints=(parse_pinpoints(d.get("image_grid_pinpoints") or anyres.DEFAULT_PINPOINTS,
                                              vision.image_size, where) if mode == "anyres" else None),
        anyres_max=d.get("anyres_max", int(m.group(1)) if m else None), image_pooling=d.get("image_pooling"),
        template=d.get("template"))


def parse_pinpoints(pinpoints, tile, where, original=False):
    """AnyRes canvases as [height, width] ints. Takes a list of pairs, its string form, or LLaVA-OneVision's
    generated grid "(1x1),...,(6x6)" (every (i, j) cell count from the first to the last, cells of `tile`
    pixels). original=True: the original code reads a pair as [width, height], so each is swapped
    (same candidates, same order: the same choices and tie-breaks)."""
    if isinstance(pinpoints, str):
        cells = re.findall(r"\((\d+)\s*x\s*(\d+)\)", pinpoints)
        if cells:
            (i0, j0), (i1, j1) = map(int, cells[0]), map(int, cells[-1])
            pinpoints = [[i * tile, j * tile] for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
        else:
            pinpoints = re.findall(r"\[\s*(\d+)\s*,\s*(\d+)\s*\]", pinpoints)
    pairs = [[int(a), int(b)] for a, b in pinpoints]
    if not pairs or any(a <= 0 or b <= 0 or a % tile or b % tile for a, b in pairs):
        raise ValueError(f"{where}: image_grid_pinpoints = {pinpoints!r} must be positive multiples of the "
                         f"tile size {tile}")
    return [[b, a] for a, b in pairs] if original else pairs


def read_original_config(d, vision_dict, where):
    """LLaVAConfig from an original (haotian-liu / LLaVA-NeXT) config.json + its vision tower's config."""
    check_implemented(d, "original", where)
    vision = read_vision_config(vision_dict, where)
    siglip = vision.model_type == "siglip_vision_model"
    if siglip:      # LLaVA-NeXT deletes SigLIP's last block and takes every token of the new last one
        vision.num_hidden_layers -= 1
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"{where}: mm_hidden_size = {d['mm_hidden_size']} but the vision tower's hidden_size is "
                         f"{vision.hidden_size}: pass vision_tower=<the CLIP directory this LLaVA was built on>")
    aspect = str(d.get("image_aspect_ratio", "square"))
    m = re.fullmatch(r"anyres(?:_max_(\d+))?", aspect)
    if m and "unpad" not in d.get("mm_patch_merge_type", "flat"):
        raise ValueError(f"{where}: mm_patch_merge_type = {d.get('mm_patch_merge_type', 'flat')!r} with "
                         f"image_aspect_ratio {aspect!r} is not implemented by nanollava (only spatial_unpad)")
    if not m and aspect not in ("square", "pad", "crop"):
        raise ValueError(f"{where}: image_aspect_ratio = {aspect!r} is not implemented by nanollava")
    model_type = d.get("model_type", "llava")
    text = read_text_config({**d, "model_type": ORIGINAL_TEXT_MODEL[model_type]}, where)
    tower = VISION_TOWER_DEFAULTS[vision.model_type]
    return LLaVAConfig(
        vision=vision, text=text, projector_type=d.get("mm_projector_type", "linear"),
        vision_feature_layer=-1 if siglip else d.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if siglip or d.get("mm_vision_select_feature") == "cls_patch"
        else "default",
        # the original splices one -200 placeholder per image; nanollava expands HF-style ids past the vocab
        image_token_id=d.get("image_token_index", d.get("image_token_id", text.vocab_size)),
        # "square": the tower's own processor (CLIP crops, SigLIP squashes)
        image_aspect_ratio="anyres" if m else tower["processor_mode"] if aspect == "square" else aspect,
        image_mean=tower["image_mean"], image_std=tower["image_std"],
        image_grid_pinpoints=(parse_pinpoints(d.get("image_grid_pinpoints") or anyres.DEFAULT_PINPOINTS,
                                              vision.image_size, where, original=True) if m else None),
        anyres_max=int(m.group(1)) if m and m.group(1) else None,
        template=ORIGINAL_TEMPLATES.get((model_type, text.vocab_size), ORIGINAL_TEMPLATES.get((model_type, None))))


def check_config(config, where):
    """What the config's fields must satisfy for the model to run them."""
    n_states = config.vision.num_hidden_layers + 1
    layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else \
        [config.vision_feature_layer]
    if not all(isinstance(i, int) and -n_states <= i < n_states for i in layers):
        raise ValueError(f"{where}: vision_feature_layer = {config.vision_feature_layer!r} is out of range for a "
                         f"{n_states - 1}-layer vision tower")
    if config.image_aspect_ratio not in ("crop", "pad", "squash", "anyres"):
        raise ValueError(f"{where}: image_aspect_ratio = {config.image_aspect_ratio!r} is not implemented by "
                         "nanollava (crop, pad, squash, anyres)")
    class_tokens = VISION_TOWERS[config.vision.model_type].class_tokens
    square = class_tokens == (config.vision_feature_select_strategy == "default")
    if (config.image_aspect_ratio == "anyres" or config.image_pooling) and not square:
        raise ValueError(f"{where}: vision_feature_select_strategy = {config.vision_feature_select_strategy!r} with "
                         f"AnyRes or pooling and a {config.vision.model_type} tower is not implemented (both need "
                         "square feature maps)")
    if config.image_pooling not in (None, "before_projector", "after_projector"):
        raise ValueError(f"{where}: image_pooling = {config.image_pooling!r} is not implemented by nanollava "
                         "(before_projector, after_projector)")
    if config.text.num_attention_heads % config.text.num_key_value_heads:
        raise ValueError(f"{where}: num_attention_heads ({config.text.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({config.text.num_key_value_heads})")
    if config.template is not None and config.template not in TEMPLATES:
        raise ValueError(f"{where}: template = {config.template!r} is not one nanollava implements "
                         f"({', '.join(TEMPLATES)})")
    return config


def infer_template(directory, text_config):
    """The conversation template a checkpoint's tokenizer files name (TEMPLATE_SIGNS), or None."""
    llm = "qwen2" if text_config.qkv_bias else None
    texts = []
    for name in TEMPLATE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if name == "tokenizer.json":                      # only its added tokens, not the vocabulary
                text = " ".join(t.get("content", "") for t in (read_json(path).get("added_tokens") or []))
            texts.append(text)
    for text in texts:                                        # chat templates before special tokens
        for sign, needs, template in TEMPLATE_SIGNS:
            if sign in text and needs in (None, llm):
                return template
    return None


def read_config(path, vision_tower=None):
    """(LLaVAConfig, the directories holding its weights) of a llava-hf, nanollava or original LLaVA dir."""
    where = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no {CONFIG_NAME})")
    d = read_json(where)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "text_config" in d or "vision_config" in d:             # llava-hf / nanollava
        config, directories = read_llava_hf_config(d, where), [path]
    elif "mm_vision_tower" in d or "mm_projector_type" in d:   # original LLaVA: mm_* fields
        clip_dir = next((c for v in (vision_tower, d.get("mm_vision_tower"), d.get("vision_tower"))
                         if isinstance(v, str) for c in (v, os.path.join(path, v))
                         if os.path.isfile(os.path.join(c, CONFIG_NAME))), None)
        has_tower = any((rename_key(k) or "").startswith("vision_tower.") for k in checkpoint_keys(path))
        if clip_dir is None and not has_tower:
            raise FileNotFoundError(f"{where}: the vision tower {d.get('mm_vision_tower')!r} is not a local "
                                    "directory; pass vision_tower=<CLIP checkpoint directory>")
        # LLaVA-1.6 and OneVision originals carry their tuned tower, shaped as the Hub tower they name
        # (KNOWN_TOWERS), else as CLIP ViT-L/14-336 (a wrong guess fails the shape check)
        known = next((t for name, t in KNOWN_TOWERS.items() if name in str(d.get("mm_vision_tower"))), {})
        vision_dict = read_json(os.path.join(clip_dir, CONFIG_NAME)) if clip_dir else {**VisionConfig().__dict__, **known}
        config = read_original_config(d, vision_dict, where)
        directories = [path] if has_tower else [clip_dir, path]
    else:
        raise ValueError(f"{where}: neither a llava-hf config (text_config/vision_config) nor an original LLaVA "
                         "config (mm_vision_tower); for separate CLIP and Llama directories use load_from_parts")
    if "template" not in d:                                    # nanollava's own config says it
        config.template = infer_template(path, config.text) or config.template
    return check_config(config, where), directories


def text_config_to_hf(text):
    """A Llama / Mistral / Qwen2 config.json dict of a TextConfig (transformers loads it)."""
    d = dict(text.__dict__)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    d["model_type"] = "qwen2" if d.pop("qkv_bias") else "mistral" if d["sliding_window"] else "llama"
    if d["model_type"] == "llama":
        del d["sliding_window"]
    if d["model_type"] == "qwen2":
        d["use_sliding_window"] = d["sliding_window"] is not None
        del d["attention_bias"]
    return d


def vision_config_to_hf(vision):
    """A CLIPVisionConfig dict of a VisionConfig."""
    return dict(vision.__dict__)


def config_to_hf(config):
    """A config.json dict that transformers' Llava, LlavaNext or LlavaOnevision ForConditionalGeneration loads
    (anyres_max_N needs OneVision's packing), plus nanollava's own keys."""
    anyres_mode = config.image_aspect_ratio == "anyres"
    model_type = "llava" if not anyres_mode else "llava_next" if config.anyres_max is None else "llava_onevision"
    d = dict(architectures=[{"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                             "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[model_type]],
             model_type=model_type, vision_config=vision_config_to_hf(config.vision),
             text_config=text_config_to_hf(config.text), image_token_index=config.image_token_id,
             projector_hidden_act="gelu", vision_feature_layer=config.vision_feature_layer,
             vision_feature_select_strategy=config.vision_feature_select_strategy,
             tie_word_embeddings=config.text.tie_word_embeddings,
             image_seq_length=(config.vision.image_size // config.vision.patch_size) ** 2,
             # nanollava's own keys (transformers ignores them)
             projector_type=config.projector_type, image_aspect_ratio=config.image_aspect_ratio,
             image_mean=list(config.image_mean), image_std=list(config.image_std), anyres_max=config.anyres_max,
             image_pooling=config.image_pooling, template=config.template)
    if anyres_mode:
        d["image_grid_pinpoints"] = pinpoints(config)
    if config.anyres_max is not None:
        d["vision_aspect_ratio"] = f"anyres_max_{config.anyres_max}"
    if config.video_token_id is not None:
        d["video_token_index"] = config.video_token_id
    return d


# ----------------------------------------------------------------------------- weights

def _all_finite(t):
    """No NaN or inf in t. A sum is one fast pass and is non-finite if any element is; only then (or when
    an fp16 sum overflows) every element is checked."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def load_weights(model, directories, dtype=torch.float32, device="cpu", fresh=()):
    """Read the tensors of `directories` into a meta-device `model` through KEY_RENAMES.

    Each tensor is checked (a known key, its shape, a float dtype, finite values) and cast as it is read;
    one ValueError lists every problem. `fresh`: nanollava key prefixes that no file needs to provide:
    they are initialised as the model initialises them (a new projector, image_newline).
    """
    expected = model.state_dict()                # meta tensors: names and shapes, no memory
    state, problems = {}, []
    for directory in directories:
        for path in weight_files(directory):
            fname = os.path.relpath(path, os.path.dirname(os.path.normpath(directory)))
            for key, tensor in iter_tensors(path):
                name = rename_key(key)
                if name is None:
                    continue
                shown = key if name == key else f"{key} (= {name})"
                if name not in expected:
                    problems.append(f"{fname}: unexpected key {shown}")
                elif tuple(tensor.shape) != tuple(expected[name].shape):
                    problems.append(f"{fname}: {shown} has shape {tuple(tensor.shape)} in the checkpoint "
                                    f"but the model expects {tuple(expected[name].shape)}")
                elif not tensor.is_floating_point():
                    problems.append(f"{fname}: {shown} has dtype {tensor.dtype}; weights must be floating point")
                elif not _all_finite(tensor):
                    problems.append(f"{fname}: {shown} holds NaN or infinite values")
                else:
                    state[name] = tensor.to(device=device, dtype=dtype)
                del tensor
    missing = [k for k in expected if k not in state and not k.startswith(tuple(fresh))]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (f", ... ({len(missing) - MAX_LISTED} more)"
                                                   if len(missing) > MAX_LISTED else "")
        problems.append(f"{' + '.join(map(str, directories))}: missing {len(missing)} key(s): {shown}")
    if problems:
        if len(problems) > MAX_LISTED + 1:
            problems = problems[:MAX_LISTED] + [f"... ({len(problems) - MAX_LISTED - 1} more)", problems[-1]]
        raise ValueError("cannot load checkpoint:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():               # what no file provided: initialised on the device
        meta = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        for n in meta:
            p = getattr(module, n)
            setattr(module, n, torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                  requires_grad=p.requires_grad))
        if meta:
            module.reset_parameters()            # nn.Linear's init; LLaVA's for image_newline
    return model


def build(config):
    """The model, on the meta device: shapes only, no memory, no random init."""
    with torch.device("meta"):
        return LLaVA(config)


def _untie_if_file_has_lm_head(config, directories):
    """transformers: a checkpoint that ties lm_head to embed_tokens but stores an lm_head of its own is
    loaded untied, with the stored lm_head (and tied again when the two are equal; see load)."""
    if config.text.tie_word_embeddings and any(rename_key(k) == "language_model.lm_head.weight"
                                               for d in directories for k in checkpoint_keys(d)):
        config.text.tie_word_embeddings = False
        return True
    return False


def load(path, dtype=torch.float32, device="cpu", vision_tower=None, template=None):
    """LLaVA.from_pretrained: a llava-hf, original LLaVA or nanollava checkpoint directory -> LLaVA.

    vision_tower: a CLIP directory for original LLaVA checkpoints that do not carry the tower
    (default: the config's `mm_vision_tower`, if that is a local directory).
    template: the conversation template, overriding what the checkpoint says.
    """
    config, directories = read_config(path, vision_tower)
    if template is not None:
        config.template = template
        check_config(config, f"template {template!r}")
    untied = _untie_if_file_has_lm_head(config, directories)
    model = load_weights(build(config), directories, dtype, device)
    lm = model.language_model
    if untied and torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight):
        config.text.tie_word_embeddings, lm.lm_head = True, None
    return model.eval()


def load_from_parts(clip_dir, llm_dir, projector=None, dtype=torch.float32, device="cpu", **config_overrides):
    """A LLaVA from a CLIP directory + a Llama/Vicuna directory (+ an optional projector file).

    The projector (and image_newline for anyres) is freshly initialised unless `projector` names
    a projector file (original `mm_projector.bin` or nanollava's `mm_projector.safetensors`).
    config_overrides: LLaVAConfig fields (projector_type, image_token_id, template, ...).
    """
    dicts = []
    for d in (clip_dir, llm_dir):
        if not os.path.isfile(os.path.join(d, CONFIG_NAME)):
            raise FileNotFoundError(f"{d}: not a checkpoint directory (no {CONFIG_NAME})")
        dicts.append(read_json(os.path.join(d, CONFIG_NAME)))
    text = read_text_config(dicts[1], os.path.join(llm_dir, CONFIG_NAME))
    vision = read_vision_config(dicts[0], os.path.join(clip_dir, CONFIG_NAME))
    mode, mean, std = read_image_processing(clip_dir, vision, None)
    # default image placeholder: one past the vocabulary (as llava-hf's 32000), never a real token
    config = LLaVAConfig(vision=vision, text=text, image_token_id=text.vocab_size, image_aspect_ratio=mode,
                         image_mean=mean, image_std=std, **VISION_TOWER_DEFAULTS[vision.model_type]["features"])
    if isinstance(config_overrides.get("image_grid_pinpoints"), str):       # "(1x1),(2x2)" or "[[h, w], ...]"
        config_overrides["image_grid_pinpoints"] = parse_pinpoints(config_overrides["image_grid_pinpoints"],
                                                                   vision.image_size, "image_grid_pinpoints")
    config = check_config(LLaVAConfig(**{**config.__dict__, **config_overrides}), "load_from_parts")
    _untie_if_file_has_lm_head(config, [llm_dir])
    model = load_weights(build(config), [clip_dir, llm_dir], dtype, device,
                         fresh=("multi_modal_projector.", "image_newline"))
    if projector is not None:
        state = load_projector(projector)
        try:
            model.multi_modal_projector.load_state_dict(
                {k: v.to(dtype) for k, v in state.items() if k != "image_newline"}, strict=True)
        except RuntimeError as e:            # missing/unexpected/shape: name the file, not a stack
            raise ValueError(f"{projector}: projector does not fit this model: {e}") from None
        if "image_newline" in state and hasattr(model, "image_newline"):
            with torch.no_grad():
                model.image_newline.copy_(state["image_newline"])
    return model


def load_projector(path):
    """Projector weights -> {"linear_1.weight": ..., ...} (+ "image_newline" if present).

    path: an original stage-1 `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`), nanollava's
    `mm_projector.safetensors` (keys `multi_modal_projector.*`), or a directory holding either.
    """
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in PROJECTOR_NAMES if os.path.exists(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(PROJECTOR_NAMES)} in this directory")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such projector file")
    state = {}
    for key, tensor in iter_tensors(path):
        name = rename_key(key)
        if name is None:
            continue
        if name.startswith("multi_modal_projector."):
            state[name[len("multi_modal_projector."):]] = tensor
        elif name == "image_newline":
            state[name] = tensor
        else:
            raise ValueError(f"{path}: unexpected key {key} in a projector file")
    if not any(k.startswith("linear_1.") for k in state):
        raise ValueError(f"{path}: no projector weights (expected model.mm_projector.* or multi_modal_projector.*)")
    return state


# ----------------------------------------------------------------------------- saving

def save_projector(model, path):
    """Write the projector (+ image_newline) as `multi_modal_projector.*` safetensors (stage 1 output)."""
    state = {f"multi_modal_projector.{k}": v for k, v in model.multi_modal_projector.state_dict().items()}
    if hasattr(model, "image_newline"):
        state["image_newline"] = model.image_newline
    _save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def _save_safetensors(state, path):
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)                        # atomic: never a half-written checkpoint


def _parse_size(size):
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' / '200MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save(model, out_dir, max_shard_size=None):
    """LLaVA.save_pretrained: config.json + model.safetensors in the llava-hf Hub layout (transformers
    loads it; a tied lm_head is left out, HF's convention). max_shard_size (bytes or "200MB") splits
    the weights into model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    os.makedirs(out_dir, exist_ok=True)
    state = dict(model.named_parameters())
    shards, limit, size = [[]], None if max_shard_size is None else _parse_size(max_shard_size), 0
    for name, p in state.items():
        nbytes = p.numel() * p.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, names in zip(files, shards):
        _save_safetensors({n: state[n].detach().cpu().contiguous() for n in names}, os.path.join(out_dir, fname))
        weight_map.update({n: fname for n in names})
    if len(files) > 1:
        total = sum(p.numel() * p.element_size() for p in state.values())
        _write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                    os.path.join(out_dir, "model.safetensors.index.json"))
    config = config_to_hf(model.config)
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    _write_json(config, os.path.join(out_dir, CONFIG_NAME))
    # only now drop what an earlier save left (a crash above leaves the old checkpoint readable)
    stale = [n for n in os.listdir(out_dir) if n not in files and (
        re.fullmatch(r"model-\d+-of-\d+\.safetensors", n) or n == "model.safetensors"
        or (n == "model.safetensors.index.json" and len(files) == 1))]
    for n in stale:
        os.remove(os.path.join(out_dir, n))


def _write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
