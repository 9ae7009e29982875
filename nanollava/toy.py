"""The toy configuration: the embedded default that runs the whole LLaVA life cycle on a laptop CPU.

NOT part of LLaVA. LLaVA-1.5 starts from CLIP ViT-L/14-336 and Vicuna-7B; the toy starts from
a tiny CLIP-style ViT and a tiny LLaMA that `pretrain_toy.py` trains on the easy-vqa TRAIN split
(64x64 images of one coloured shape), then runs the real recipe on them: `train.py --stage 1`
(projector only, `plain` captions) and `--stage 2` (projector + LLM, `vicuna_v1` QA).

This module is the one place the toy's sizes, paths and step counts live; pretrain_toy.py,
train.py's defaults, pipeline.py and the tests read it.

  vision   image 64, patch 8 -> 8x8 = 64 patch tokens, hidden 64, 4 blocks (LLaVA reads layer -2,
           so block 4 is never run), quick_gelu, as CLIP
  text     LLaMA, hidden 128, 4 layers, 4 heads (head_dim 32), SwiGLU 384, vocab = the toy tokenizer
  LLaVA    mlp2x_gelu projector 64 -> 128, vision_feature_layer -2, "default" (CLS dropped), pad images

The shapes benchmark (ablate.py, nanollava/shapes.py) uses the same sizes with 48 px images (its
96 px scenes are two tiles wide), and `pretrain_toy.py --size large` makes the scaling ablation's
second size: +0.42M parameters that run on either side (the ViT's last block never runs).

  large    vision hidden 96, MLP 384, 6 blocks (+416,672 run); text 6 layers (+426,496)
"""
from nanollava.config import TextConfig, VisionConfig

DATA_DIR = "data/toy"            # data_prep.py output: tokenizer.json, stage1/2.json, eval_*.jsonl, images
OUT_DIR = "out/toy"
CLIP_DIR = "out/toy/clip"        # pretrain_toy.py: CLIPVisionModel layout (config.json + model.safetensors)
LLAMA_DIR = "out/toy/llama"      # pretrain_toy.py: LlamaForCausalLM layout (+ tokenizer.json)

SHAPES = ("circle", "rectangle", "triangle")                                      # easy-vqa's answers
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")

VISION = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256,
              num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu")
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0)

VISION_LARGE = dict(VISION, hidden_size=96, intermediate_size=384, num_hidden_layers=6)
TEXT_LARGE = dict(TEXT, num_hidden_layers=6)

SHAPES_DATA_DIR = "data/shapes"  # data_prep.py --benchmark shapes
SHAPES_IMAGE_SIZE = 48           # the tower's tile: half the scenes' 96 px

# pretrain_toy.py (toy only): optimizer steps, batch, peak lr (AdamW, warmup + cosine)
VISION_PRETRAIN = dict(steps=600, batch_size=64, lr=3e-3, weight_decay=0.05)
TEXT_PRETRAIN = dict(steps=30, batch_size=16, block_size=256, lr=3e-3, weight_decay=0.1)
SHAPES_VISION_PRETRAIN = dict(steps=600, batch_size=64, lr=3e-3, weight_decay=0.05)   # half base views, half tiles


def vision_config(size="small", image_size=None):
    """The toy CLIP vision tower's config (CLIPVisionConfig fields)."""
    sizes = dict({"small": VISION, "large": VISION_LARGE}[size])
    return VisionConfig(**dict(sizes, image_size=image_size or sizes["image_size"]))


def text_config(tokenizer, size="small"):
    """The toy LLaMA's config; vocab and special ids come from the toy tokenizer."""
    return TextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id, **{"small": TEXT, "large": TEXT_LARGE}[size])
