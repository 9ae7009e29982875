"""Model configuration: three small dataclasses built from (and written back to) HF config.json dicts.

VisionConfig = CLIPVisionConfig, TextConfig = LlamaConfig (+ Qwen2's q/k/v bias),
LLaVAConfig = LlavaConfig / LlavaNextConfig plus the few nanollava-only fields that
sample.py, eval.py and data.py read (image_aspect_ratio, template, anyres_*).
"""
from dataclasses import asdict, dataclass, field, fields

# Defaults a llava config.json falls back on when `vision_config` is absent (HF LlavaConfig:
# CLIP ViT-L/14 at 336 px). A vision_config dict that is present but incomplete takes the
# plain CLIPVisionConfig class defaults instead, exactly as transformers does.
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14)
_CLIP_VISION_CLASS_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=32)
# LlamaConfig class defaults that differ from TextConfig's (TextConfig mirrors Vicuna-7B v1.5).
_LLAMA_CLASS_DEFAULTS = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=None,
                             num_key_value_heads=None)
# nanollava-only fields stored as extra top-level keys of config.json.
_NANOLLAVA_KEYS = ("image_aspect_ratio", "anyres_convention", "anyres_max", "template")


def _pick(cls, d, defaults=None):
    """Keep the keys of `d` that are fields of `cls`, filling the rest from `defaults`."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in (defaults or {}).items() if k in names}
    kw.update({k: v for k, v in d.items() if k in names})
    return kw


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (CLIPVisionConfig); defaults are ViT-L/14 at 336 px."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, d):
        """From a CLIP config.json: clip_vision_model, or a full CLIPModel (uses its vision_config)."""
        if "vision_config" in d:
            d = d["vision_config"] or {}
        return cls(**_pick(cls, d, _CLIP_VISION_CLASS_DEFAULTS))

    def to_hf(self):
        return dict(asdict(self), model_type="clip_vision_model")


@dataclass
class TextConfig:
    """LLaMA decoder (LlamaConfig); qkv_bias adds Qwen2-style q/k/v biases. Defaults: Vicuna-7B v1.5."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None            # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # HF Llama: bias on q, k, v and o
    qkv_bias: bool = False                 # Qwen2: bias on q, k, v only
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, d):
        """From a Llama / Mistral / Qwen2 config.json (or a llava text_config) dict."""
        kw = _pick(cls, d, _LLAMA_CLASS_DEFAULTS)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"RoPE scaling type {rope_type!r} is not supported (only plain RoPE)")
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        kw["qkv_bias"] = d.get("qkv_bias", d.get("model_type") == "qwen2")
        return cls(**kw)

    def to_hf(self):
        d = asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        if d.pop("qkv_bias"):
            d["model_type"] = "qwen2"      # Qwen2 = Llama + q/k/v bias, the only way HF spells it
            d.pop("attention_bias")
        else:
            d["model_type"] = "llama"
        return d


@dataclass
class LLaVAConfig:
    """LLaVA-1.5 / NeXT: vision tower -> projector -> LLM, plus nanollava's data/template choices."""
    vision: VisionConfig = field(default_factory=lambda: VisionConfig())
    text: TextConfig = field(default_factory=lambda: TextConfig())
    projector_type: str = "mlp2x_gelu"          # "mlp2x_gelu" (LLaVA-1.5) | "linear" (LLaVA-1.0)
    vision_feature_layer: int | list = -2       # HF hidden_states index (0 = embeddings); list = concat
    vision_feature_select_strategy: str = "default"   # "default" drops CLS | "full" keeps it
    image_token_id: int = 32000
    image_aspect_ratio: str = "pad"             # "crop" | "pad" | "anyres"
    image_grid_pinpoints: list | None = None    # [[h, w], ...] (HF convention) for anyres
    anyres_convention: str = "hf"               # "hf" | "original" (REFERENCE §3)
    anyres_max: int | None = None               # N of anyres_max_N
    template: str = "vicuna_v1"

    def __post_init__(self):
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector_type must be 'mlp2x_gelu' or 'linear', not {self.projector_type!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' or 'full', "
                             f"not {self.vision_feature_select_strategy!r}")
        if self.image_aspect_ratio not in ("crop", "pad", "anyres"):
            raise ValueError(f"image_aspect_ratio must be crop, pad or anyres, not {self.image_aspect_ratio!r}")

    @property
    def num_image_tokens(self):
        """Visual tokens per crop/pad image: (image_size // patch_size)**2, +1 with the CLS for "full"."""
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        return n + (self.vision_feature_select_strategy == "full")

    @classmethod
    def from_hf(cls, d):
        """From a llava-hf `llava` or `llava_next` config.json dict."""
        vd = d.get("vision_config")
        vision = VisionConfig(**_CLIP_L_336) if vd is None else VisionConfig.from_hf(vd)
        text = TextConfig.from_hf(d.get("text_config") or {})
        if d.get("tie_word_embeddings"):
            text.tie_word_embeddings = True
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act {d['projector_hidden_act']!r} is not supported (only gelu)")
        is_next = d.get("model_type") == "llava_next"
        kw = dict(
            vision=vision, text=text,
            projector_type=d.get("projector_type", "mlp2x_gelu"),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            image_aspect_ratio="anyres" if is_next else "pad",
            image_grid_pinpoints=d.get("image_grid_pinpoints"),
        )
        kw.update({k: d[k] for k in _NANOLLAVA_KEYS if k in d})
        return cls(**kw)

    def to_hf(self):
        """A config.json dict that transformers' Llava(Next)ForConditionalGeneration loads."""
        anyres = self.image_aspect_ratio == "anyres"
        d = dict(
            architectures=["LlavaNextForConditionalGeneration" if anyres else "LlavaForConditionalGeneration"],
            model_type="llava_next" if anyres else "llava",
            vision_config=self.vision.to_hf(),
            text_config=self.text.to_hf(),
            image_token_index=self.image_token_id,
            image_seq_length=self.num_image_tokens,
            projector_hidden_act="gelu",
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            tie_word_embeddings=self.text.tie_word_embeddings,
            projector_type=self.projector_type,
        )
        if self.image_grid_pinpoints is not None:
            d["image_grid_pinpoints"] = self.image_grid_pinpoints
        d.update({k: getattr(self, k) for k in _NANOLLAVA_KEYS})
        return d
