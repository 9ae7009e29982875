"""Time and memory of nanollava.checkpoint.load: the weights are held exactly once.

Saves a random LLaVA (CLIP 4 layers + a 6-layer 1024-wide LLaMA with a 32000 vocab,
~150M params, ~590 MB fp32) with checkpoint.save, then loads it in a fresh process per dtype and
samples the process's anonymous resident memory (RssAnon, Linux) every 2 ms during the load.
float32 loads are zero-copy: the parameters are the safetensors file's pages (copy-on-write),
so anonymous memory barely grows; bfloat16 loads cast tensor by tensor, so the growth should
equal the parameter bytes (one copy), not twice that.
--shape onevision-0.9b: LLaVA-OneVision-0.5B's shapes (SigLIP SO400M with 26 blocks at 384 px + Qwen2-0.5B,
tied, vocab 151936; 0.89B params), saved in bfloat16.

    python bench/bench_checkpoint_load.py [--dir /tmp/nanollava_bench_ckpt] [--shape onevision-0.9b]
"""
import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanollava import checkpoint  # noqa: E402


def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e3 for line in f if line.startswith("RssAnon"))


def measure(directory, dtype):
    peak, done = [0.0], []

    def watch():
        while not done:
            peak[0] = max(peak[0], anon_mb())
            time.sleep(0.002)
    base = anon_mb()
    thread = threading.Thread(target=watch)
    thread.start()
    t = time.perf_counter()
    try:
        model = checkpoint.load(directory, dtype=getattr(torch, dtype))
    finally:                                    # a failed load must not leave the sampler running
        done.append(True)
        thread.join()
    dt = time.perf_counter() - t
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(f"| {dtype} | {params:.0f} | {max(peak[0], anon_mb()) - base:.0f} | {dt:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/nanollava_bench_ckpt", help="where the random checkpoint is written")
    p.add_argument("--shape", choices=["small", "onevision-0.9b"], default="small")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)    # child process: one dtype
    args = p.parse_args()
    if args.measure:
        return measure(args.dir, args.measure)
    if not os.path.exists(os.path.join(args.dir, "model.safetensors")):
        from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
        from nanollava.llava import LLaVA
        if args.shape == "small":
            config = LLaVAConfig(
                vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                    num_attention_heads=4, image_size=56, patch_size=14),
                text=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                                num_attention_heads=8, num_key_value_heads=8))
        else:
            config = LLaVAConfig(
                vision=VisionConfig(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                    num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                                    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
                text=TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, qkv_bias=True,
                                tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
                vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_id=151646,
                image_aspect_ratio="anyres", anyres_max=9, template="qwen_1_5")
        model = LLaVA(config)
        checkpoint.save(model.to(torch.float32 if args.shape == "small" else torch.bfloat16), args.dir)
        del model
    size = os.path.getsize(os.path.join(args.dir, "model.safetensors")) / 1e6
    print(f"checkpoint {args.dir}/model.safetensors: {size:.0f} MB\n")
    print("| dtype | params MB | anonymous RSS growth MB (peak) | load s |\n|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        subprocess.run([sys.executable, __file__, "--dir", args.dir, "--measure", dtype], check=True)


if __name__ == "__main__":
    main()
