"""Model configuration: three small dataclasses, the canonical form every checkpoint is read into.

VisionConfig = the CLIP or SigLIP ViT tower, TextConfig = the LLaMA decoder (Mistral and Qwen2 are LLaMA
plus a field or two), LLaVAConfig = how they are joined, plus the data-side choices sample.py,
eval.py and data.py read (image mode, pinpoints, conversation template). Field names are HF's.

The model only reads these fields; which checkpoint file, layout or convention they came from is
the loader's business (nanollava/checkpoint.py), and so is refusing what nanollava does not
implement. Defaults are LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px + Vicuna-7B v1.5.
"""
from dataclasses import dataclass, field

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)    # CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """ViT vision tower (HF CLIPVisionConfig / SiglipVisionConfig fields)."""
    model_type: str = "clip_vision_model"   # which tower: llava.VISION_TOWERS
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"          # "quick_gelu" (CLIP) | "gelu" | "gelu_pytorch_tanh" (SigLIP)


@dataclass
class TextConfig:
    """LLaMA decoder (HF LlamaConfig fields); Qwen2 adds q/k/v biases, Mistral a sliding window."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None            # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    sliding_window: int | None = None      # Mistral: attention span; nanollava runs only sequences within it
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False      # lm_head reuses embed_tokens
    attention_bias: bool = False           # HF Llama: bias on q, k, v and o
    qkv_bias: bool = False                 # Qwen2: bias on q, k, v only
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads

    @property
    def context_length(self):
        """Longest sequence the decoder runs: its positions, capped by the sliding window (within
        the window, sliding-window attention is full causal attention)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


@dataclass
class LLaVAConfig:
    """LLaVA-1.5 / NeXT: vision tower -> projector -> LLM (HF LlavaConfig / LlavaNextConfig fields)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"          # "mlp2x_gelu" (LLaVA-1.5) | "linear" (LLaVA-1.0)
    vision_feature_layer: int | list = -2       # hidden_states index (0 = embeddings); a list is concatenated
    vision_feature_select_strategy: str = "default"   # "default" drops CLS | "full" keeps it
    image_token_id: int = 32000                 # the placeholder id, once per visual token
    image_aspect_ratio: str = "pad"             # "crop" | "pad" | "squash" (SigLIP's) | "anyres" (LLaVA-NeXT)
    image_mean: tuple = CLIP_MEAN               # pixel normalisation of the tower's image processor
    image_std: tuple = CLIP_STD
    image_grid_pinpoints: list | None = None    # anyres canvases as [height, width]; None = LLaVA-1.6's
    anyres_max: int | None = None               # N of anyres_max_N (LLaVA-OneVision): a grid's token threshold
    image_pooling: str | None = None            # 2x2 pooling of every view: "before_projector" | "after_projector"
    video_token_id: int | None = None           # LLaVA-OneVision's video placeholder id
    template: str | None = "vicuna_v1"          # conversation template; None = not known
