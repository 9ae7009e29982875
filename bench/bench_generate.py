"""
Decode speed of nanollava.generate vs HF transformers' generate on the same random LLaVA.

Both run greedy, fp32, on the same weights (nanollava saves, transformers loads), with the
same prompt: one image per row (576 visual tokens at 336 px) plus ~30 text tokens, exactly
--new-tokens new tokens (eos disabled). Time to first token = one full generate call with
max_new_tokens=1 (vision tower + prefill + first sample); decode tokens/s = (new_tokens - 1)
* batch / (t(new_tokens) - t(1)). Median of --reps runs, nanollava and HF interleaved so
that background load hits both alike; wall-clock and process CPU time are both reported
(CPU time is the steadier one on a shared machine).

    python bench/bench_generate.py                       # CPU, batch 1 and 4, 64 new tokens
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanollava import LLaVA, LLaVAConfig, TextConfig, VisionConfig  # noqa: E402
from nanollava.generate import generate  # noqa: E402
from nanollava.llava import num_image_tokens  # noqa: E402


def build(layers, hidden, device):
    config = LLaVAConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                            image_size=336, patch_size=14),
        text=TextConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                        num_hidden_layers=layers, num_attention_heads=hidden // 64,
                        num_key_value_heads=hidden // 64, max_position_embeddings=2048),
        image_token_id=32000)
    torch.manual_seed(0)
    return LLaVA(config).to(device).eval()


def prompt(config, batch, device):
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(3, 31999, (batch, n), generator=g)
    image = torch.full((batch, num_image_tokens(config, (336, 336))), config.image_token_id)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text(20), image, text(10)], 1).to(device)
    pixels = torch.randn(batch, 3, 336, 336, generator=g).to(device)
    return ids, pixels


def timed(fn, device):
    """(wall seconds, CPU seconds of this process, fn()). On a shared CPU the CPU time is the
    steadier measure: it does not count the time other processes held the cores."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration

    nano = build(args.layers, args.hidden, args.device)
    with tempfile.TemporaryDirectory() as d:
        nano.save_pretrained(d)
        hf = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).to(args.device).eval()
    hf.generation_config.pad_token_id = 0

    def run_nano(ids, pixels, n):
        return generate(nano, ids, pixel_values=pixels, max_new_tokens=n, eos_token_id=[])

    def run_hf(ids, pixels, n):
        out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:]

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"Llama {args.layers} layers hidden {args.hidden} vocab 32064, CLIP 3 layers hidden 256 at 336 px "
          f"(576 image tokens), {args.new_tokens} new tokens, fp32, median of {args.reps}")
    print(f"{'batch':>5} {'impl':>9} {'TTFT ms':>9} {'TTFT cpu-ms':>12} {'decode tok/s':>13} "
          f"{'tok/cpu-s':>10} {'same tokens':>12}")
    with torch.no_grad():
        for batch in args.batch:
            ids, pixels = prompt(nano.config, batch, args.device)
            times = {k: {1: [], args.new_tokens: []} for k in ("nanollava", "hf")}
            outs = {}
            run_nano(ids, pixels, 2), run_hf(ids, pixels, 2)  # warm-up
            for _ in range(args.reps):
                for name, fn in (("nanollava", run_nano), ("hf", run_hf)):
                    for n in (1, args.new_tokens):
                        wall, cpu, out = timed(lambda: fn(ids, pixels, n), args.device)
                        times[name][n].append((wall, cpu))
                        outs[name] = out
            same = torch.equal(outs["nanollava"].cpu(), outs["hf"].cpu())
            res = {}
            for name in ("nanollava", "hf"):
                r = {}
                for i, kind in enumerate(("wall", "cpu")):
                    t1 = statistics.median(t[i] for t in times[name][1])
                    tn = statistics.median(t[i] for t in times[name][args.new_tokens])
                    r[kind] = (t1, (args.new_tokens - 1) * batch / (tn - t1))
                res[name] = r
                print(f"{batch:>5} {name:>9} {1000 * r['wall'][0]:>9.0f} {1000 * r['cpu'][0]:>12.0f} "
                      f"{r['wall'][1]:>13.1f} {r['cpu'][1]:>10.1f} {str(same):>12}")
            n, h = res["nanollava"], res["hf"]
            print(f"{batch:>5} {'nano/hf':>9} {h['wall'][0] / n['wall'][0]:>8.2f}x {h['cpu'][0] / n['cpu'][0]:>11.2f}x "
                  f"{n['wall'][1] / h['wall'][1]:>12.2f}x {n['cpu'][1] / h['cpu'][1]:>9.2f}x"
                  "   (> 1 = nanollava faster)")

if __name__ == "__main__":
    main()
