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

# pretrain_toy.py (toy only): optimizer steps, batch, peak lr (AdamW, warmup + cosine)
VISION_PRETRAIN = dict(steps=600, batch_size=64, lr=3e-3, weight_decay=0.05)
TEXT_PRETRAIN = dict(steps=30, batch_size=16, block_size=256, lr=3e-3, weight_decay=0.1)


def vision_config():
    """The toy CLIP vision tower's config (CLIPVisionConfig fields)."""
    return VisionConfig(**VISION)


def text_config(tokenizer):
    """The toy LLaMA's config; vocab and special ids come from the toy tokenizer."""
    return TextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id, **TEXT)
