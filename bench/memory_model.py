"""Per-GPU memory of LLaVA-1.5 stage 2 under nanollava's FSDP: the formula, and its checks.

  python bench/memory_model.py            # prints the tables of docs/memory.md

1. Activations: saved-for-backward bytes per token per LLaMA decoder layer, measured with
   torch.autograd.graph.saved_tensors_hooks on tiny CPU models (fp32), with and without
   activation checkpointing; fitted as a*h + b*i elements (h hidden, i MLP width).
2. The per-GPU table for 7B / 13B stage 2 on 8 GPUs from the formula in docs/memory.md.
Measured FSDP bytes per rank (master shards + grads + AdamW) come from train.py's
metrics.jsonl `fsdp_bytes`; see docs/memory.md.
"""
import torch

from nanollava.config import TextConfig
from nanollava.llama import LlamaForCausalLM

GB = 1e9


def saved_bytes(h, i, layers, checkpointing, B=2, T=64):
    """Bytes autograd keeps for backward (unique storages, parameters excluded)."""
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=64, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).train()
    model.gradient_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 64, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).sum().backward()       # recomputed blocks save in backward: count them too
    return sum(seen.values())


def activation_per_token_layer(checkpointing, B=2, T=64):
    """(a, b): saved fp32 elements per token per layer = a*h + b*i (differencing 2 vs 4 layers)."""
    def per_layer(h, i):
        d = saved_bytes(h, i, 4, checkpointing, B, T) - saved_bytes(h, i, 2, checkpointing, B, T)
        return d / 2 / (B * T) / 4                                 # fp32 elements
    e1, e2 = per_layer(64, 128), per_layer(64, 256)
    b = (e2 - e1) / 128
    a = (e1 - b * 128) / 64
    return a, b


LLMS = {  # Vicuna v1.5 (LLaMA-2): hidden, layers, MLP width, vocab
    "7B": dict(h=4096, L=32, i=11008, V=32000),
    "13B": dict(h=5120, L=40, i=13824, V=32000),
}
CLIP_L_336 = 303.5e6      # CLIP ViT-L/14-336 vision tower parameters (frozen in 1.5's stage 2)


def per_gpu(llm, world, tokens, checkpointing, act_coef, train_tower=False):
    """Bytes per GPU (dict) for stage 2 under nanollava FSDP with bf16 compute."""
    h, L, i, V = llm["h"], llm["L"], llm["i"], llm["V"]
    block = 4 * h * h + 3 * h * i + 2 * h                           # attention + SwiGLU + 2 RMSNorm
    root = 2 * V * h + h + (1024 * h + h + h * h + h)               # embed + lm_head + norm + projector
    N = L * block + root + (CLIP_L_336 if train_tower else 0)       # trainable
    a, b = act_coef
    act_layer = (a * h + b * i) * 2                                 # bf16 bytes per token per layer
    out = {
        "master params fp32 (4N/W)": 4 * N / world,
        "grads fp32 (4N/W)": 4 * N / world,
        "AdamW m, v fp32 (8N/W)": 8 * N / world,
        "root gathered bf16 + its grad": 2 * root + (2 + 4) * root,
        "2 blocks gathered bf16 + 1 grad": 2 * 2 * block + (2 + 4) * block,
        "frozen tower bf16": 0 if train_tower else 2 * CLIP_L_336,
        "activations": tokens * (L * act_layer if not checkpointing else L * 2 * h + act_layer),
        "logits + CE (fp32)": tokens * V * (2 + 4 + 4),
    }
    return N, out


def main():
    torch.set_num_threads(1)
    full = activation_per_token_layer(False)
    ckpt = activation_per_token_layer(True)
    print(f"measured saved elements / token / layer: no checkpointing {full[0]:.2f} h + {full[1]:.2f} i; "
          f"checkpointing {ckpt[0]:.2f} h + {ckpt[1]:.2f} i\n")
    print("| LLM | tokens / GPU / micro-batch | checkpointing | sharded state 16N/W | gathered units | "
          "frozen tower | activations | logits + CE | **total** | A100-80G / H100-80G |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, llm in LLMS.items():
        for tokens, ck in ((16 * 2048, True), (16 * 800, True), (16 * 2048, False), (4 * 2048, False)):
            N, p = per_gpu(llm, 8, tokens, ck, full)
            total = sum(p.values())
            sharded = p["master params fp32 (4N/W)"] + p["grads fp32 (4N/W)"] + p["AdamW m, v fp32 (8N/W)"]
            gathered = p["root gathered bf16 + its grad"] + p["2 blocks gathered bf16 + 1 grad"]
            print(f"| {name} | {tokens:,} | {'yes' if ck else 'no'} | {sharded / GB:.1f} GB | {gathered / GB:.1f} GB | "
                  f"{p['frozen tower bf16'] / GB:.1f} GB | {p['activations'] / GB:.1f} GB | "
                  f"{p['logits + CE (fp32)'] / GB:.1f} GB | **{total / GB:.1f} GB** | "
                  f"{'fits' if total < 76 * GB else 'OOM'} |")


if __name__ == "__main__":
    main()
