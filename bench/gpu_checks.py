"""The measurements behind `python -m bench.gpu` (docs/gpu.md). Each one also runs alone, and on
a CPU at a tiny shape, which is how CI tests them; each writes its table rows, [check, result,
target], as JSON to --rows.

    python -m bench.gpu_checks toy DIR                       # synthetic toy inputs: no download, no easy-vqa
    python -m bench.gpu_checks compare A B --rtol 0.02       # two train.py runs: the same loss curve?
    python -m bench.gpu_checks mfu --shape 1b                # one training step's MFU, LLaVA with a 1.1B LLM
    python -m bench.gpu_checks decode --shape 7b             # batch-1 decode tokens/s vs the HBM bound
    python -m bench.gpu_checks kernels BENCH.json            # nanollava.kernels.bench --json against the targets

The targets (issue 14) are reported, not asserted: attention fwd+bwd >= 1.0x SDPA at the ViT shape
and >= 0.9x at the Vicuna shape; RMSNorm >= 70% of HBM bandwidth and faster than nn.RMSNorm;
training MFU >= 40%; 7B decode at batch 1 >= 70% of the memory-bandwidth bound.
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                   # train.py lives at the repo root

# HBM bandwidth per GPU, bytes/s, from NVIDIA's datasheets; the first name the device name
# contains wins, so the specific variants come first
PEAK_HBM_BYTES = (
    ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),       # H100 SXM
    ("H200", 4.8e12),                                                     # H200 SXM and NVL
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB", 1.935e12), ("A100", 1.555e12),
    ("L40", 0.864e12), ("L4", 0.3e12), ("4090", 1.008e12),
)

# (vision tower, LLM) shapes: VisionConfig / TextConfig fields
SHAPES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8),
             dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)),
    # CLIP ViT-L/14-336 + a TinyLlama-1.1B-shaped LLM: a 1.4B LLaVA
    "1b": (dict(), dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4)),
    "7b": (dict(), dict()),                                # CLIP ViT-L/14-336 + Vicuna-7B (the defaults)
}


def peak_bandwidth(device):
    return next((b for k, b in PEAK_HBM_BYTES if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None


def write_rows(path, rows):
    for row in rows:
        print(" | ".join(row))
    if path:
        with open(path, "w") as f:
            json.dump(rows, f)


def random_model(config_cls, config, device, dtype):
    """A model of the given config with random weights (normal, std 0.02), built on the meta device
    and materialised on `device` in `dtype`: a 7B in seconds, no checkpoint needed."""
    with torch.device("meta"):
        model = config_cls(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


# ---- toy inputs ---------------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def toy(out, n=64, seed=0):
    """train.py's inputs in `out`: n 64x64 images of a coloured square or circle, stage-2 records
    asking about them (every fourth one text-only), a BPE tokenizer, a random toy-size CLIP and
    LLaMA (nanollava/toy.py) in the HF layout and a random stage-1 projector."""
    from PIL import Image, ImageDraw
    from safetensors.torch import save_file
    from nanollava import checkpoint, toy as toy_config
    from nanollava.clip import CLIPVisionTower
    from nanollava.llama import LlamaForCausalLM
    from nanollava.tokenizer import Tokenizer, train_bpe
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(["square", "circle"])
        img = Image.new("RGB", (64, 64), "white")
        box = [rng.randint(4, 20), rng.randint(4, 20), rng.randint(40, 60), rng.randint(40, 60)]
        (ImageDraw.Draw(img).rectangle if shape == "square" else ImageDraw.Draw(img).ellipse)(box, fill=COLORS[color])
        img.save(os.path.join(out, "images", f"{i}.png"))
        turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": color},
                 {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": f"It is a {shape}."}]
        if i % 4 == 3:                                     # text-only
            turns = [{"from": "human", "value": f"Name a colour like {color}."}, {"from": "gpt", "value": color}]
        records.append(dict(id=str(i), conversations=turns, **({} if i % 4 == 3 else {"image": f"{i}.png"})))
    with open(os.path.join(out, "stage2.json"), "w") as f:
        json.dump(records, f)
    texts = [t["value"].replace("<image>", "") for r in records for t in r["conversations"]] + ["USER: ASSISTANT:"]
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(train_bpe(texts, vocab_size=256).tok.to_str())
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    torch.manual_seed(seed)
    vision, text = toy_config.vision_config(), toy_config.text_config(tok)
    for name, model, config in (("clip", CLIPVisionTower(vision), checkpoint.vision_config_to_hf(vision)),
                                ("llama", LlamaForCausalLM(text), checkpoint.text_config_to_hf(text))):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out, name, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, name, "config.json"), "w") as f:
            json.dump(dict(config, architectures=["CLIPVisionModel" if name == "clip" else "LlamaForCausalLM"]), f)
    llava = checkpoint.load_from_parts(os.path.join(out, "clip"), os.path.join(out, "llama"),
                                       image_token_id=tok.image_token_id)
    checkpoint.save_projector(llava, os.path.join(out, "mm_projector.safetensors"))
    print(f"toy inputs in {out}: {n} records, {len(tok)} tokens")


# ---- two train.py runs: the same training? -------------------------------------------------------

def compare(runs, rtol, check, rows_path):
    """The per-step losses of train.py runs (their OUT dirs) against the first: max relative
    difference <= rtol. Returns the exit status."""
    curves = []
    for run in runs:
        path = os.path.join(run, "metrics.jsonl")
        curves.append([json.loads(l) for l in open(path)] if os.path.isfile(path) else [])
    ref = torch.tensor([x["loss"] for x in curves[0]])
    if not all(len(c) == len(ref) > 0 for c in curves):
        write_rows(rows_path, [[check, f"FAILED: steps logged {[len(c) for c in curves]}", f"<= {rtol:.1%}"]])
        return 1
    worst = max((torch.tensor([x["loss"] for x in c]) - ref).abs().div(ref.abs()).max().item() for c in curves[1:])
    tok_s = " / ".join(f"{sorted(x['tokens_per_s'] for x in c)[len(c) // 2]:,.0f}" for c in curves)
    write_rows(rows_path, [[check, f"max relative loss difference {worst:.2%} over {len(ref)} steps; loss "
                                   f"{ref[0]:.3f} -> {ref[-1]:.3f}; median tok/s {tok_s}", f"<= {rtol:.1%}"]])
    return 0 if worst <= rtol else 1


# ---- a training step's MFU -------------------------------------------------------------------------

def mfu(shape, device, micro_batch, seq, steps, rows_path):
    """Training steps of a random LLaVA (stage 2: projector + LLM trained, tower frozen) through
    train.py's own pieces: nanollava FSDP on one rank, bf16 autocast, AdamW, clipping. MFU as
    train.py logs it (flops_per_token: 6N-style, attention's T^2 left out)."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _mfu(shape, device, micro_batch, seq, steps, rows_path)
    finally:
        dist.destroy_process_group()


def _mfu(shape, device, micro_batch, seq, steps, rows_path):
    import train
    from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
    from nanollava.fsdp import PrefetchFSDP
    from nanollava.llava import LLaVA, num_image_tokens
    vision, text = SHAPES[shape]
    config = LLaVAConfig(vision=VisionConfig(**vision), text=TextConfig(**text), image_token_id=text.get("vocab_size", 32000))
    model = random_model(LLaVA, config, device, torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(train.param_group(name) != "vision_tower")
    numel = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.language_model.parameters()),
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    units = list(model.language_model.model.layers) + list(model.vision_tower.vision_model.encoder.layers)
    fsdp = PrefetchFSDP(model, units, group_fn=train.param_group, param_dtype=dtype, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    S = config.vision.image_size
    n_img = num_image_tokens(config, (S, S))
    ids = torch.randint(0, config.image_token_id, (micro_batch, seq), device=device)
    ids[:, 1:1 + n_img] = config.image_token_id                                 # one image per sample
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    pixels = torch.randn(micro_batch, 3, S, S, device=device)
    times = []
    for step in range(steps + 2):                                               # 2 warm-up steps
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(ids, labels, pixels)
        loss.backward()
        fsdp.reduce_grads()
        train.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(train.elapsed(t0, device))
    dt = sorted(times[2:])[len(times[2:]) // 2]
    tok_s = micro_batch * seq / dt
    peak = train.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    mem = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.0f} GiB" if device.type == "cuda" else ""
    result = (f"{'MFU %.1f%%' % (100 * train.flops_per_token(*numel) * tok_s / peak) if peak else 'MFU: unknown GPU'}"
              f" ({numel[0] / 1e9:.2f}B params, {micro_batch} x {seq} tokens per step, {dt * 1e3:.0f} ms, "
              f"{tok_s:,.0f} tok/s{mem})")
    write_rows(rows_path, [[f"training step MFU, {shape} LLaVA, {str(dtype).removeprefix('torch.')}, nanollava FSDP",
                            result, ">= 40%"]])


# ---- batch-1 decode ----------------------------------------------------------------------------------

@torch.no_grad()
def decode(shape, device, prompt, new_tokens, rows_path):
    """Greedy decoding with nanollava.generate (prefill, then one token per step from the KV cache)
    of a random LLM at batch 1, against the memory-bandwidth bound: each step reads every weight
    but the embedding table once, plus the KV cache so far."""
    from nanollava.config import TextConfig
    from nanollava.generate import stream
    from nanollava.llama import LlamaForCausalLM
    text = TextConfig(**SHAPES[shape][1])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(LlamaForCausalLM, text, device, dtype).eval()
    ids = torch.randint(0, text.vocab_size, (1, prompt), device=device)
    for _ in range(2):                                             # the first run compiles the kernels
        tokens, t_first = 0, None
        for token in stream(model, ids, max_new_tokens=new_tokens, eos_token_id=-1):
            if t_first is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_first = time.time()
            tokens += 1
        tok_s = (tokens - 1) / (time.time() - t_first)                 # stream synchronises every step
    size = next(model.parameters()).element_size()
    weights = size * sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n or
                         text.tie_word_embeddings)                 # a tied table is the lm_head too
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * (prompt + new_tokens / 2) * size
    bandwidth = peak_bandwidth(device)
    bound = bandwidth / (weights + kv) if bandwidth else None
    result = (f"{tok_s:,.1f} tok/s" + (f" = {tok_s / bound:.0%} of the {bound:,.0f} tok/s bound "
                                       f"({(weights + kv) / 1e9:.1f} GB per token at {bandwidth / 1e12:.2f} TB/s)"
                                       if bound else " (HBM bandwidth of this device unknown)")
              + f", prompt {prompt}, {new_tokens} new tokens")
    write_rows(rows_path, [[f"decode at batch 1, {shape} LLM, {str(dtype).removeprefix('torch.')}", result, ">= 70%"]])


# ---- nanollava.kernels.bench against the targets --------------------------------------------------------------

def kernels(bench_json, rows_path):
    """Rows for nanollava.kernels.bench --json: attention fwd+bwd vs SDPA at the ViT and Vicuna shapes,
    RMSNorm's bandwidth and its speedup over nn.RMSNorm."""
    bench = json.load(open(bench_json))
    bandwidth = next((b for k, b in PEAK_HBM_BYTES if k in bench["device"]), None)
    rows = []
    for r in bench["rows"]:
        if r["kernel"] == "attention" and r["pass"] == "fwd+bwd":
            target = ">= 1.0x" if "CLIP" in r["case"] else ">= 0.9x" if "Vicuna" in r["case"] else "-"
            rows.append([f"attention fwd+bwd, {r['case']}", f"{r['speedup']:.2f}x SDPA "
                         f"({r['triton_ms']:.2f} vs {r['sdpa_ms']:.2f} ms, {r['triton_tflops']:.0f} TFLOP/s)", target])
        if r["kernel"] == "rms_norm" and r["impl"] == "triton":
            nn = next(x for x in bench["rows"] if x["kernel"] == "rms_norm" and x["pass"] == r["pass"]
                      and x["case"] == r["case"] and x["impl"] == "nn.RMSNorm")
            share = f" = {r['gbps'] * 1e9 / bandwidth:.0%} of HBM" if bandwidth else ""
            rows.append([f"RMSNorm {r['pass']}, {r['case']}", f"{r['gbps']:,.0f} GB/s{share}, "
                         f"{nn['speedup']:.2f}x nn.RMSNorm", ">= 70% of HBM, > 1.0x"])
    write_rows(rows_path, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("toy", "compare", "mfu", "decode", "kernels"))
    p.add_argument("paths", nargs="*", help="toy: DIR; compare: train.py OUT dirs; kernels: nanollava.kernels.bench JSON")
    p.add_argument("--rows", help="write the table rows here (JSON)")
    p.add_argument("--check", default="runs agree", help="compare: what the row says is checked")
    p.add_argument("--rtol", type=float, default=0.02, help="compare: largest relative loss difference")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--micro-batch", type=int, default=8, help="mfu: samples per step")
    p.add_argument("--seq", type=int, default=2048, help="mfu: tokens per sample")
    p.add_argument("--steps", type=int, default=3, help="mfu: timed steps (after 2 warm-up steps)")
    p.add_argument("--prompt", type=int, default=128, help="decode: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: generated tokens")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.what == "toy":
        return toy(args.paths[0]) or 0
    if args.what == "compare":
        return compare(args.paths, args.rtol, args.check, args.rows)
    if args.what == "mfu":
        return mfu(args.shape, device, args.micro_batch, args.seq, args.steps, args.rows) or 0
    if args.what == "decode":
        return decode(args.shape, device, args.prompt, args.new_tokens, args.rows) or 0
    return kernels(args.paths[0], args.rows) or 0


if __name__ == "__main__":
    sys.exit(main())
