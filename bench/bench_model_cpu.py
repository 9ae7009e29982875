"""nanollava vs HF transformers LLaVA on CPU: forward and forward+backward wall time.

Same random weights in both (HF state dict copied into nanollava), float32, 2 threads.
Config: CLIP 4 layers x 256 at 224/14 (256 patches) + Llama 4 layers x 512 (8 heads, MLP 1376,
vocab 8192); batch 4 x 320 tokens (one image = 256 placeholder tokens + 64 text tokens each).
--family siglip-qwen2: the same sizes as SigLIP (no CLS, tanh GELU, layer -1, "full") + Qwen2
(q/k/v biases, tied embeddings), the LLaVA-NeXT ablations' and OneVision's parts.

    python bench/bench_model_cpu.py [--threads 2] [--iters 3] [--family siglip-qwen2]
"""
import argparse
import statistics
import time

import torch
import transformers

from nanollava import LLaVA, LLaVAConfig, TextConfig, VisionConfig, checkpoint
from nanollava.llava import num_image_tokens

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
parser.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--feature-layer", type=int, default=-2,
                    help="vision_feature_layer; -2 (LLaVA) lets nanollava skip the last CLIP block, -1 runs all")
parser.add_argument("--text", type=int, default=64, help="text tokens per sample besides the image tokens")
parser.add_argument("--family", choices=["clip-llama", "siglip-qwen2"], default="clip-llama")
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

V = 8192
siglip = args.family == "siglip-qwen2"
config = LLaVAConfig(
    vision=VisionConfig(model_type="siglip_vision_model" if siglip else "clip_vision_model", hidden_size=256,
                        intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                        patch_size=14, hidden_act="gelu_pytorch_tanh" if siglip else "quick_gelu"),
    text=TextConfig(vocab_size=V, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=8, qkv_bias=siglip, tie_word_embeddings=siglip),
    vision_feature_layer=-1 if siglip else args.feature_layer,
    vision_feature_select_strategy="full" if siglip else "default", image_token_id=V - 1)


models = {}
for impl in ("eager", "sdpa"):
    torch.manual_seed(0)
    hf_config = transformers.LlavaConfig.from_dict(checkpoint.config_to_hf(config))   # one each: HF stores the choice in it
    models[f"hf-{impl}"] = transformers.LlavaForConditionalGeneration._from_config(hf_config, attn_implementation=impl)
    assert models[f"hf-{impl}"].model.language_model.config._attn_implementation == impl
nano = LLaVA(config)
state = {checkpoint.rename_key(k): v for k, v in models["hf-eager"].state_dict().items()}
nano.load_state_dict({k: v for k, v in state.items() if k in nano.state_dict()}, strict=True)  # tied: no lm_head
models = {"nanollava": nano, **models}

n_img = num_image_tokens(config, (224, 224))
B, T = args.batch, n_img + args.text
ids = torch.randint(0, V - 1, (B, T))
ids[:, 1:1 + n_img] = config.image_token_id
labels = ids.masked_fill(ids == config.image_token_id, -100)
pixels = torch.randn(B, 3, 224, 224)


def run(name, backward):
    model = models[name]
    if name == "nanollava":
        if backward:
            model.loss(ids, labels, pixel_values=pixels).backward()
        else:
            model(ids, pixel_values=pixels)
    else:
        if backward:
            model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
        else:
            model(input_ids=ids, pixel_values=pixels)


def bench(backward):
    """Median wall time and median process CPU time (all threads) per model, in seconds.

    On a shared box the CPU time is the steadier figure: time spent waiting for a core is not in it.
    """
    wall, cpu = ({name: [] for name in models} for _ in range(2))
    for i in range(args.warmup + args.iters):
        for name, model in models.items():         # interleaved, so load from other processes hits all alike
            model.train(backward)
            model.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.set_grad_enabled(backward):
                run(name, backward)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


print(f"{args.family}: torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
      f"batch {B} x {T} tokens ({n_img} image tokens), feature layer {config.vision_feature_layer}, median of {args.iters}")
for backward in (False, True):
    what = "forward+backward" if backward else "forward"
    wall, cpu = bench(backward)
    for name in models:
        print(f"{what:17s} {name:10s} wall {wall[name] * 1000:8.1f} ms (nanollava/{name} {wall['nanollava'] / wall[name]:.2f})"
              f"   cpu {cpu[name] * 1000:8.1f} ms (nanollava/{name} {cpu['nanollava'] / cpu[name]:.2f})")
