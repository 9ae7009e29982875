"""Time and memory of nanollava.checkpoint.load: the weights are held exactly once.

Saves a random LLaVA (CLIP 4 layers + a 6-layer 1024-wide LLaMA with a 32000 vocab,
~150M params, ~590 MB fp32) with checkpoint.save, then loads it in a fresh process per dtype and
samples the process's anonymous resident memory (RssAnon, Linux) every 2 ms during the load.
float32 loads are zero-copy: the parameters are the safetensors file's pages (copy-on-write),
so anonymous memory barely grows; bfloat16 loads cast tensor by tensor, so the growth should
equal the parameter bytes (one copy), not twice that.

    python bench/bench_checkpoint_load.py [--dir /tmp/nanollava_bench_ckpt]
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
    model = checkpoint.load(directory, dtype=getattr(torch, dtype))
    dt = time.perf_counter() - t
    done.append(True)
    thread.join()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(f"| {dtype} | {params:.0f} | {max(peak[0], anon_mb()) - base:.0f} | {dt:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/nanollava_bench_ckpt", help="where the random checkpoint is written")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)    # child process: one dtype
    args = p.parse_args()
    if args.measure:
        return measure(args.dir, args.measure)
    if not os.path.exists(os.path.join(args.dir, "model.safetensors")):
        from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
        from nanollava.llava import LLaVA
        config = LLaVAConfig(
            vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=4, image_size=56, patch_size=14),
            text=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=8))
        checkpoint.save(LLaVA(config), args.dir)
    size = os.path.getsize(os.path.join(args.dir, "model.safetensors")) / 1e6
    print(f"checkpoint {args.dir}/model.safetensors: {size:.0f} MB\n")
    print("| dtype | params MB | anonymous RSS growth MB (peak) | load s |\n|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        subprocess.run([sys.executable, __file__, "--dir", args.dir, "--measure", dtype], check=True)


if __name__ == "__main__":
    main()
