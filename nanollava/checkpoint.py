"""Checkpoint loading and saving: every LLaVA weight layout in the wild -> one nanollava model.

nanollava's parameter names ARE the llava-hf Hub layout (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.*`,
`image_newline`), so loading is a table of key-prefix renames (KEY_RENAMES) and saving is a
plain `state_dict()` dump that transformers' LlavaForConditionalGeneration reads as is.

Sources (REFERENCE §5):
  - llava-hf LLaVA-1.5 / NeXT, old Hub layout and the newer `model.language_model.*` layout
    (transformers 5 also drops the `vision_model.` segment of the CLIP tower);
  - original LLaVA (haotian-liu): Vicuna keys + `model.mm_projector.{0,2}`, `mm_*` config fields,
    vision weights from a separate CLIP directory (`mm_vision_tower` or `vision_tower=`);
    LLaVA-1.6 originals carry the tuned tower as `model.vision_tower.vision_tower.vision_model.*`;
  - a CLIP directory (CLIPModel or CLIPVisionModel) and a Llama/Vicuna directory, combined by
    `load_llava_from_parts` (what training starts from);
  - nanollava's own checkpoints (= llava-hf old layout + config.json with nanollava fields).

Weights are read with safetensors' `safe_open` (or `torch.load(mmap=True)` for `.bin`) one tensor
at a time, cast, and assigned into a model whose parameters were created on the meta device, so
only one copy of the weights is ever held. No transformers import anywhere.
"""
import dataclasses
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanollava.anyres import DEFAULT_PINPOINTS, original_pinpoints_to_hf
from nanollava.config import LLaVAConfig, TextConfig, VisionConfig

# (checkpoint key prefix, nanollava key prefix); the first matching row wins, None = ignore.
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
# Buffers some checkpoints carry that LLaVA recomputes: dropped silently.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PROJECTOR_NAMES = ("mm_projector.safetensors", "mm_projector.bin")
MAX_LISTED = 20          # an error lists at most this many keys per kind of problem


def rename_key(key):
    """Checkpoint key -> nanollava key (None: a key LLaVA ignores, "": a key nothing maps)."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    for src, dst in KEY_RENAMES:
        if key.startswith(src):
            return None if dst is None else dst + key[len(src):]
    return ""


# ----------------------------------------------------------------------------- reading files

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
    except Exception as e:  # pickle / zip errors: a truncated download or not a checkpoint
        raise ValueError(f"{path}: cannot read PyTorch weights file, truncated or corrupt? ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for key in list(state):
        yield key, state.pop(key)                # free each source tensor once handed over


def checkpoint_keys(directory):
    """All tensor names of a checkpoint directory, without reading the tensors (safetensors/index)."""
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


# ----------------------------------------------------------------------------- building models

class _ParamsOnMeta:
    """Context: parameters are created on the meta device (no memory), buffers for real.

    The model's own constructor still computes its non-persistent buffers (RoPE tables etc.),
    while the weights are only materialised once, from the checkpoint. Random init of the
    meta parameters is skipped (the first meta normal_ alone costs seconds of torch imports).
    """

    def __enter__(self):
        self.register = torch.nn.Module.register_parameter
        self.inits = {n: getattr(torch.nn.init, n) for n in dir(torch.nn.init)
                      if n.endswith("_") and not n.startswith("_")}

        def register_parameter(module, name, param):
            if param is not None and param.device.type != "meta":
                param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            self.register(module, name, param)

        def skip_meta(init):
            return lambda tensor, *args, **kwargs: tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        torch.nn.Module.register_parameter = register_parameter
        for n, init in self.inits.items():
            setattr(torch.nn.init, n, skip_meta(init))

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self.register
        for n, init in self.inits.items():
            setattr(torch.nn.init, n, init)


def _new_model(config):
    from nanollava.llava import LLaVA       # llava.py imports this module: import lazily
    with _ParamsOnMeta():
        return LLaVA(config)


def _param_aliases(model):
    """nanollava key -> list of (owner module, attribute) sharing that parameter (tied weights)."""
    by_id, aliases = {}, {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is None:
                continue
            key = f"{mod_name}.{name}" if mod_name else name
            group = by_id.setdefault(id(p), [])
            group.append((module, name))
            aliases[key] = group
    return aliases


def load_weights(model, directories, dtype=torch.float32, device="cpu", allow_missing=()):
    """Copy the tensors of `directories` into `model` through KEY_RENAMES, one tensor at a time.

    Raises ONE ValueError listing every unexpected key, shape mismatch and missing parameter.
    `allow_missing`: nanollava key prefixes that may stay absent (they are freshly initialised).
    """
    aliases = _param_aliases(model)
    buffers = dict(model.named_buffers())
    problems = []
    for directory in directories:
        for path in weight_files(directory):
            fname = os.path.relpath(path, os.path.dirname(os.path.normpath(directory)))
            for key, tensor in iter_tensors(path):
                name = rename_key(key)
                if name is None:
                    continue
                shown = key if name == key else f"{key} (= {name})"
                if name not in aliases and name not in buffers:
                    problems.append(f"{fname}: unexpected key {shown}")
                    continue
                expected = (aliases[name][0][0]._parameters[aliases[name][0][1]] if name in aliases
                            else buffers[name])
                if tuple(tensor.shape) != tuple(expected.shape):
                    problems.append(f"{fname}: {shown} has shape {tuple(tensor.shape)} in the checkpoint "
                                    f"but the model expects {tuple(expected.shape)}")
                    continue
                target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                if name in aliases:
                    p = torch.nn.Parameter(tensor.to(device=device, dtype=target_dtype),
                                           requires_grad=expected.requires_grad)
                    for module, attr in aliases[name]:
                        module._parameters[attr] = p
                else:
                    buffers[name].copy_(tensor)
                del tensor
    missing = [k for k, group in aliases.items()
               if group[0][0]._parameters[group[0][1]].is_meta and not k.startswith(tuple(allow_missing))]
    if missing:
        where = " + ".join(str(d) for d in directories)
        shown = ", ".join(missing[:MAX_LISTED]) + (f", ... ({len(missing) - MAX_LISTED} more)"
                                                   if len(missing) > MAX_LISTED else "")
        problems.append(f"{where}: missing {len(missing)} key(s): {shown}")
    if problems:
        if len(problems) > MAX_LISTED + 1:
            problems = problems[:MAX_LISTED] + [f"... ({len(problems) - MAX_LISTED - 1} more)", problems[-1]]
        raise ValueError("cannot load checkpoint:\n  " + "\n  ".join(problems))
    _init_missing(model, dtype, device)
    return model.to(device)                      # the params are there already: moves buffers


def _init_missing(model, dtype, device):
    """Materialise and initialise parameters no checkpoint provided (new projector, image_newline)."""
    for module in model.modules():
        own = [n for n, p in module._parameters.items() if p is not None and p.is_meta]
        if not own:
            continue
        for n in own:
            p = module._parameters[n]
            module._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                       requires_grad=p.requires_grad)
        if hasattr(module, "reset_parameters") and len(own) == len(list(module.parameters(recurse=False))):
            module.reset_parameters()            # nn.Linear / nn.LayerNorm defaults
        else:                                    # a bare nn.Parameter such as image_newline
            with torch.no_grad():
                for n in own:
                    t = module._parameters[n]
                    t.normal_(0.0, t.shape[-1] ** -0.5)   # original LLaVA: randn(H) / sqrt(H)


# ----------------------------------------------------------------------------- configs

def _vision_tower_dir(path, vision_tower, config_dict):
    """The CLIP directory an original LLaVA checkpoint takes its vision weights from (or None)."""
    candidates = [vision_tower, config_dict.get("mm_vision_tower"), config_dict.get("vision_tower")]
    for c in candidates:
        if isinstance(c, str):
            for d in (c, os.path.join(path, c)):
                if os.path.isfile(os.path.join(d, CONFIG_NAME)):
                    return d
    return None


def original_llava_config(d, vision_dict):
    """LLaVAConfig from an original (haotian-liu) LLaVA config.json + the CLIP tower's config.json."""
    merge = d.get("mm_patch_merge_type", "flat")
    aspect = d.get("image_aspect_ratio", "square")
    anyres_max = None
    m = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if m:
        anyres_max, aspect = int(m.group(1)), "anyres"
    elif str(aspect).startswith("anyres"):
        aspect = "anyres"
    if aspect == "anyres" and "unpad" not in merge:
        raise ValueError(f"mm_patch_merge_type {merge!r} is not supported for anyres (only spatial_unpad)")
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {select!r} is not supported (patch or cls_patch)")
    vision = VisionConfig.from_hf(vision_dict)
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"config mm_hidden_size {d['mm_hidden_size']} != vision tower hidden_size "
                         f"{vision.hidden_size}: pass vision_tower=<the CLIP directory this LLaVA was built on>")
    return LLaVAConfig(
        vision=vision, text=TextConfig.from_hf(d),
        projector_type=d.get("mm_projector_type", "linear"),
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if select == "cls_patch" else "default",
        # the original splices one -200 placeholder per image; nanollava expands HF-style ids
        image_token_id=d.get("image_token_index", d.get("image_token_id", d.get("vocab_size", 32000))),
        image_aspect_ratio={"square": "crop"}.get(aspect, aspect),
        # the original reads each pinpoint as (w, h): store the equivalent HF [h, w] list
        image_grid_pinpoints=(original_pinpoints_to_hf(d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS,
                                                       vision.image_size) if aspect == "anyres" else None),
        anyres_convention="original", anyres_max=anyres_max,
    )


# ----------------------------------------------------------------------------- public API

def load_llava(path, dtype=torch.float32, device="cpu", vision_tower=None):
    """Load a llava-hf, original LLaVA or nanollava checkpoint directory into a nanollava LLaVA.

    vision_tower: a CLIP directory for original LLaVA checkpoints that do not carry the tower
    (default: the config's `mm_vision_tower`, if that is a local directory).
    """
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no {CONFIG_NAME})")
    d = read_json(config_path)
    directories = [path]
    if "text_config" in d or "vision_config" in d:            # llava-hf / nanollava
        config = LLaVAConfig.from_hf(d)
    else:                                                      # original LLaVA: mm_* fields
        if "mm_vision_tower" not in d and "mm_projector_type" not in d:
            raise ValueError(f"{config_path}: neither a llava-hf config (text_config/vision_config) nor "
                             "an original LLaVA config (mm_vision_tower); for separate CLIP and Llama "
                             "directories use load_llava_from_parts")
        clip_dir = _vision_tower_dir(path, vision_tower, d)
        has_tower = any((rename_key(k) or "").startswith("vision_tower.") for k in checkpoint_keys(path))
        if clip_dir is None and not has_tower:
            raise FileNotFoundError(
                f"{config_path}: the vision tower {d.get('mm_vision_tower')!r} is not a local directory; "
                "pass vision_tower=<CLIP checkpoint directory>")
        # LLaVA-1.6 originals carry the tuned tower: its shape is CLIP ViT-L/14-336 unless a CLIP
        # directory says otherwise (the shape check in load_weights catches a wrong guess).
        vision_dict = (read_json(os.path.join(clip_dir, CONFIG_NAME)) if clip_dir is not None
                       else dataclasses.asdict(VisionConfig()))
        config = original_llava_config(d, vision_dict)
        if not has_tower:
            directories = [clip_dir, path]
    model = _new_model(config)
    return load_weights(model, directories, dtype, device)


def load_llava_from_parts(clip_dir, llm_dir, projector=None, dtype=torch.float32, device="cpu",
                          **config_overrides):
    """A LLaVA from a CLIP directory + a Llama/Vicuna directory (+ an optional projector file).

    The projector (and image_newline for anyres) is freshly initialised unless `projector` names
    a projector file (original `mm_projector.bin` or nanollava's `mm_projector.safetensors`).
    config_overrides: LLaVAConfig fields (projector_type, image_token_id, vision_feature_layer, ...).
    """
    for d in (clip_dir, llm_dir):
        if not os.path.isfile(os.path.join(d, CONFIG_NAME)):
            raise FileNotFoundError(f"{d}: not a checkpoint directory (no {CONFIG_NAME})")
    text = TextConfig.from_hf(read_json(os.path.join(llm_dir, CONFIG_NAME)))
    # default image placeholder: one past the vocabulary (like llava-hf's 32000), never a real token
    config = LLaVAConfig(vision=VisionConfig.from_hf(read_json(os.path.join(clip_dir, CONFIG_NAME))),
                         text=text, image_token_id=text.vocab_size)
    config = dataclasses.replace(config, **config_overrides)
    model = _new_model(config)
    model = load_weights(model, [clip_dir, llm_dir], dtype, device,
                         allow_missing=("multi_modal_projector.", "image_newline"))
    if projector is not None:
        state = load_projector(projector)
        try:
            model.multi_modal_projector.load_state_dict(
                {k: v.to(dtype) for k, v in state.items() if k != "image_newline"}, strict=True)
        except RuntimeError as e:            # missing/unexpected/shape: name the file, not a stack
            raise ValueError(f"{projector}: projector does not fit this model: {e}") from None
        if "image_newline" in state and getattr(model, "image_newline", None) is not None:
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


def save_projector(model, path):
    """Write the projector (+ image_newline) as `multi_modal_projector.*` safetensors (stage 1 output)."""
    state = {f"multi_modal_projector.{k}": v for k, v in model.multi_modal_projector.state_dict().items()}
    if getattr(model, "image_newline", None) is not None:
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


def save_llava(model, out_dir, max_shard_size=None):
    """Write config.json + model.safetensors in the llava-hf Hub layout (transformers loads it).

    Tied lm_head is left out (HF convention). max_shard_size (bytes or "200MB") splits the weights
    into model-0000i-of-0000n.safetensors + model.safetensors.index.json.
    """
    os.makedirs(out_dir, exist_ok=True)
    state, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:                        # tied: keep the first name (embed_tokens)
            continue
        seen.add(id(p))
        state[name] = p
    shards = [[]]
    limit, size = _parse_size(max_shard_size) if max_shard_size is not None else None, 0
    for name, p in state.items():
        nbytes = p.numel() * p.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, names in zip(files, shards):
        _save_safetensors({n: state[n].detach().cpu().contiguous() for n in names}, os.path.join(out_dir, fname))
        weight_map.update({n: fname for n in names})
    if len(files) > 1:
        total = sum(p.numel() * p.element_size() for p in state.values())
        _write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                    os.path.join(out_dir, "model.safetensors.index.json"))
    config = model.config.to_hf()
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
