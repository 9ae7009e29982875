"""Train LLaVA-1.5 in two stages (Liu et al., "Improved Baselines with Visual Instruction Tuning" §4).

  stage 1 (feature alignment): CLIP and the LLM frozen, only the projector learns, on image
          captions with the `plain` template (lr 1e-3, global batch 256). Saves the projector
          alone: OUT/mm_projector.safetensors and the original-style OUT/mm_projector.bin.
  stage 2 (visual instruction tuning): starts from the stage-1 projector (--stage1-out) and
          trains projector + LLM on conversations with `vicuna_v1` (lr 2e-5, global batch 128);
          --train-vision-tower also tunes CLIP at its own lr (LLaVA-NeXT: 2e-6); --lora trains
          LoRA adapters (r 128, alpha 256, lr 2e-4) instead of the LLM, and the projector at
          2e-5 (LLaVA-1.5's finetune_lora.sh). Exports OUT/final in the llava-hf layout
          (sample.py / eval.py / transformers load it), LoRA merged in.

Both: AdamW (0.9, 0.999), weight decay 0, cosine schedule with 3% linear warmup, one epoch,
bf16 autocast on CUDA with fp32 master weights, ZeRO-3 over torchrun ranks: `--fsdp nano`
(nanollava/fsdp.py, by hand) or `--fsdp torch` (PyTorch's FSDP2), the same checkpoints.
A step is the same whatever the world size and micro-batch: a global batch is a fixed set of
samples, and its loss is the sum of its token losses over its count of supervised tokens
(docs/fsdp.md says how this differs from the original's mean of per-micro-batch means).

  python train.py --stage 1                       # the toy: runs on a laptop CPU
  python train.py --stage 2
  torchrun --nproc_per_node 8 train.py --stage 2 --vision-tower clip-vit-large-patch14-336 \\
      --llm vicuna-7b-v1.5 --data llava_v1_5_mix665k.json --image-folder data --device cuda \\
      --micro-batch 16 --max-length 2048 --grad-checkpointing

Writes OUT/metrics.jsonl (one JSON per optimizer step), OUT/loss.png, sharded checkpoints in
OUT/ckpt/step_N/ (nanollava/train_checkpoint.py; the last complete one is named by
OUT/ckpt/latest) and resumes with --resume, with either engine, at any world size.

Faults: every file is written atomically (nanollava/files.py); checkpoints are safetensors + JSON,
never pickle; the newest --keep-last checkpoints are kept, the previous one until the next is
complete. Ctrl-C / SIGTERM finish the step, save a checkpoint and exit non-zero (130 / 143) with
the resume command; so does a torchrun worker whose launcher died. OUT is locked for the run
(OUT/train.lock). A record that cannot be used is skipped, warned about and counted
(metrics.jsonl "skipped", summed over ranks).
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import nullcontext
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from nanollava import files, toy, train_checkpoint
from nanollava.checkpoint import VISION_TOWER_DEFAULTS, build, load_from_parts, save_projector
from nanollava.cli import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from nanollava.conversation import TEMPLATES
from nanollava.data import DataError, LLaVADataset, collate, global_batches, rank_micro_batches
from nanollava.fsdp import PrefetchFSDP
from nanollava.llava import PROJECTOR_TYPES, supervised_tokens
from nanollava.lora import add_lora, merge_lora, save_adapters
from nanollava.tokenizer import Tokenizer
from nanollava.train_checkpoint import local

# -----------------------------------------------------------------------------------------
# defaults: the LLaVA-1.5 recipe (docs/llava.md §4) on the toy's paths (nanollava/toy.py). The one
# place they live: parse_args starts from DEFAULTS, then the stage's row, then --lora's, then the
# command line.
DEFAULTS = dict(
    vision_tower=toy.CLIP_DIR, llm=toy.LLAMA_DIR, image_folder=os.path.join(toy.DATA_DIR, "images"),
    tokenizer=None,            # None: LLM/tokenizer.json, else the one next to the data
    stage1_out="out/stage1",   # stage 2 starts from this projector
    micro_batch=16,            # per rank per forward; accumulation makes up the global batch
    max_length=2048,           # LLaVA-1.5 (NeXT: 4096)
    epochs=1,                  # the recipe: one epoch per stage
    max_steps=None,            # None: the whole schedule
    schedule_steps=None,       # None: epochs x global batches per epoch
    warmup_ratio=0.03,
    projector_lr=None,         # None: --lr (LLaVA's mm_projector_lr)
    vision_lr=2e-6,            # LLaVA-NeXT's unfrozen tower
    train_vision_tower=False,
    betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
    grad_clip=1.0,             # HF Trainer's default max_grad_norm, which LLaVA inherits
    grad_checkpointing=False,
    lora=False, lora_r=128, lora_alpha=256,
    projector_type="mlp2x_gelu",   # LLaVA-1.5's connector
    image_grid_pinpoints=None, image_pooling=None, skip_stage1=False,
    fsdp="nano",
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if torch.cuda.is_available() else "float32",  # autocast + gathered weights
    seed=1337,
    save_every=0,              # 0: checkpoints only at the end, on Ctrl-C and on SIGTERM
    keep_last=2,               # the newest, and one to fall back on if it is damaged
    resume=False,
    num_workers=0, log_every=1,
    dist_timeout=600,          # seconds a rank waits in a collective before the run fails (torch: 30 min)
)
STAGE = {   # image_mode None: the vision tower's own processor (CLIP: crop, SigLIP: squash)
    1: dict(template="plain", image_mode=None, lr=1e-3, global_batch=256, group_by_length=False,
            data=os.path.join(toy.DATA_DIR, "stage1.json"), out="out/stage1"),
    2: dict(template="vicuna_v1", image_mode="pad", lr=2e-5, global_batch=128, group_by_length=True,
            data=os.path.join(toy.DATA_DIR, "stage2.json"), out="out/stage2"),
}
LORA = dict(lr=2e-4, projector_lr=2e-5)     # finetune_lora.sh: adapters 2e-4, mm_projector_lr 2e-5
# -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    """DEFAULTS, updated by STAGE[--stage] (and LORA with --lora), then by the command line."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", type=int, choices=(1, 2))
    first.add_argument("--lora", action="store_true")
    known, _ = first.parse_known_args(argv)
    p = argparse.ArgumentParser(description="LLaVA-1.5 stage 1 / stage 2 training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: projector on captions; 2: + LLM")
    p.add_argument("--vision-tower", help="CLIP / SigLIP vision directory (HF layout)")
    p.add_argument("--llm", help="Llama/Vicuna directory (HF layout)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: LLM/tokenizer.json, else the data dir's)")
    p.add_argument("--data", help="LLaVA JSON")
    p.add_argument("--image-folder", help="image root")
    p.add_argument("--stage1-out", help="stage 2: the stage-1 OUT dir or projector file")
    p.add_argument("--out", help="output directory")
    p.add_argument("--lr", type=positive_float, help="peak lr of the LLM (or its LoRA adapters)")
    p.add_argument("--projector-lr", type=positive_float, help="peak lr of the projector (default: --lr)")
    p.add_argument("--train-vision-tower", action="store_true", help="stage 2: also tune CLIP (LLaVA-NeXT)")
    p.add_argument("--vision-lr", type=positive_float, help="peak lr of the vision tower")
    p.add_argument("--lora", action="store_true", help="stage 2: LoRA adapters on every LLM linear layer "
                                                       "instead of the LLM (LLaVA-1.5 finetune_lora)")
    p.add_argument("--lora-r", type=positive_int, help="LoRA rank")
    p.add_argument("--lora-alpha", type=positive_float, help="LoRA scale alpha (the update is alpha / r x BA)")
    p.add_argument("--global-batch", type=positive_int, help="samples per optimizer step, whatever the world size")
    p.add_argument("--micro-batch", type=positive_int, help="samples per rank per forward")
    p.add_argument("--max-length", type=positive_int, help="max tokens per sample (images kept whole)")
    p.add_argument("--epochs", type=positive_int, help="passes over the data")
    p.add_argument("--max-steps", type=positive_int, help="stop after N optimizer steps (schedule unchanged)")
    p.add_argument("--schedule-steps", type=positive_int, help="length of the lr schedule (default: epochs)")
    p.add_argument("--warmup-ratio", type=fraction, help="linear warmup fraction")
    p.add_argument("--grad-clip", type=non_negative_float, help="global grad-norm clip (0: off)")
    p.add_argument("--grad-checkpointing", action="store_true", help="per-block activation checkpointing")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                   help="LLaVA's group_by_modality_length over each global batch (else a plain shuffle)")
    p.add_argument("--fsdp", choices=("nano", "torch"), help="ZeRO-3 engine: nanollava/fsdp.py or PyTorch's FSDP2")
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype: bf16 autocast and bf16 gathered weights (master weights stay fp32)")
    p.add_argument("--save-every", type=non_negative_int,
                   help="sharded checkpoint every N steps (0: only at the end, on Ctrl-C and on SIGTERM)")
    p.add_argument("--keep-last", type=positive_int,
                   help="checkpoints kept (older ones are deleted once a newer one is complete)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt/latest (or the newest older one if it is damaged)")
    p.add_argument("--seed", type=int, help="model init, data order")
    p.add_argument("--num-workers", type=non_negative_int, help="DataLoader worker processes")
    p.add_argument("--log-every", type=positive_int, help="print a step line every N steps")
    p.add_argument("--dist-timeout", type=positive_float,
                   help="seconds a rank waits for the others in a collective before the run fails")
    p.add_argument("--template", choices=TEMPLATES,
                   help="conversation template (stage 1: plain; stage 2: e.g. mistral_instruct, qwen_1_5 "
                        "for the LLM's own chat format)")
    p.add_argument("--image-mode", choices=("crop", "pad", "squash", "anyres"),
                   help="image preprocessing (default: stage 1 the tower's own, crop for CLIP and squash for "
                        "SigLIP; stage 2 pad, LLaVA-1.5's)")
    p.add_argument("--projector-type", choices=PROJECTOR_TYPES,
                   help="the connector: LLaVA-1.5's mlp2x_gelu (default) or LLaVA's linear; stage 2 must name the "
                        "type stage 1 trained")
    p.add_argument("--image-grid-pinpoints",
                   help="AnyRes canvases: '(1x1),(2x2)' (every grid from 1x1 to 2x2, in tiles) or "
                        "'[[672, 672], ...]' (height, width); default LLaVA-1.6's")
    p.add_argument("--image-pooling", choices=("before_projector", "after_projector"),
                   help="2x2 bilinear pooling of every view's features (LLaVA-NeXT ablations, OneVision)")
    p.add_argument("--skip-stage1", action="store_true",
                   help="stage 2 from a fresh projector, no stage-1 alignment (LLaVA §5.2's 'skip pre-training')")
    p.set_defaults(**{**DEFAULTS, **STAGE.get(known.stage, {}), **(LORA if known.lora else {})})
    return p.parse_args(argv)


def check_inputs(args, world):
    """Every bad input is a clear error before any work (nothing loaded yet)."""
    toy_hint = {args.data: "run `python data_prep.py` first",
                args.vision_tower: "run `python pretrain_toy.py` first (or pass --vision-tower DIR)",
                args.llm: "run `python pretrain_toy.py` first (or pass --llm DIR)"}
    for path, kind in ((args.data, "data file"), (args.image_folder, "image folder"),
                       (args.vision_tower, "vision tower directory"), (args.llm, "LLM directory")):
        if not os.path.exists(path):
            hint = toy_hint.get(path, "") if path.startswith(("data/toy", "out/toy")) else ""
            raise FileNotFoundError(f"{kind} not found: {path}" + (f"; {hint}" if hint else ""))
    per_step = args.micro_batch * world
    if args.global_batch % per_step:
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch} "
                         f"x {world} ranks = {per_step}; change one of them")
    if args.stage == 1 and (args.train_vision_tower or args.lora or args.template != "plain" or args.skip_stage1):
        raise ValueError("--train-vision-tower, --lora, --template and --skip-stage1 are stage-2 options (stage 1 "
                         "trains the projector only, on captions in the plain template)")
    if args.image_grid_pinpoints and args.image_mode != "anyres":
        raise ValueError(f"--image-grid-pinpoints is AnyRes's: it needs --image-mode anyres (not {args.image_mode})")
    if args.stage == 2 and args.template == "plain":
        raise ValueError("--template plain is stage 1's (captions); stage 2 trains on conversations")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU")
    if args.stage == 2 and not args.skip_stage1:
        stage1_projector(args.stage1_out)
    find_tokenizer(args)


def stage1_projector(path):
    """The stage-1 -> stage-2 hand-off: the projector file stage 1 wrote (in OUT or given directly)."""
    if os.path.isfile(path):
        return path
    for name in ("mm_projector.safetensors", "mm_projector.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"stage 2 starts from the stage-1 projector, but {path} holds no "
                            f"mm_projector.safetensors / mm_projector.bin: run `python train.py --stage 1 "
                            f"--out {path}` first, or point --stage1-out at a projector file")


def find_tokenizer(args):
    for path in (args.tokenizer, os.path.join(args.llm, "tokenizer.json"),
                 os.path.join(os.path.dirname(args.data), "tokenizer.json")):
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no tokenizer.json in {args.llm} or next to {args.data}; pass --tokenizer")


def param_group(name):
    """Per-parameter-group learning rates: projector / LLM (and its LoRA adapters) / vision tower."""
    if name.startswith("vision_tower."):
        return "vision_tower"
    if name.startswith("language_model."):
        return "llm"
    return "projector"                                   # multi_modal_projector.*, image_newline


def lr_lambda(step, total, warmup_ratio):
    """Linear warmup over the first warmup_ratio of the steps, then cosine to 0 (HF `cosine`)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_config(args):
    """What a checkpoint must agree with to be resumed. Not the world size, the micro-batch or the
    FSDP engine: they do not change the training."""
    keys = ("stage", "vision_tower", "llm", "data", "global_batch", "max_length", "lr", "projector_lr",
            "train_vision_tower", "vision_lr", "lora", "lora_r", "lora_alpha", "seed", "schedule_steps",
            "epochs", "warmup_ratio", "group_by_length", "template", "image_mode", "dtype", "projector_type",
            "image_grid_pinpoints", "image_pooling", "skip_stage1")
    return {k: getattr(args, k) for k in keys}


class BadInput(Exception):
    """A bad command line / path / checkpoint, found before any work."""


# ---- init -----------------------------------------------------------------------------------

def init_distributed(args):
    """The default process group, for one rank too (FSDP and the step's all-reduce then need no
    special case): torchrun's environment, else a one-rank group in memory. Returns the device."""
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend, timeout = "nccl" if args.device == "cuda" else "gloo", timedelta(seconds=args.dist_timeout)
    if "MASTER_ADDR" in os.environ:                      # torchrun (or another launcher)
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_launcher()
    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def build_model(args, tok, device):
    """LLaVA from the vision tower + the LLM (+ the stage-1 projector), with what trains switched
    on: stage 1 the projector; stage 2 the projector + the LLM, or the LLM's LoRA adapters; the
    tower with --train-vision-tower."""
    # the exported model's template and image mode are stage 2's (stage 1 saves the projector alone)
    model = load_from_parts(args.vision_tower, args.llm, device=device, image_token_id=tok.image_token_id,
                            projector=stage1_projector(args.stage1_out) if args.stage == 2 and not args.skip_stage1
                            else None,
                            template=STAGE[2]["template"] if args.stage == 1 else args.template,
                            image_aspect_ratio="pad" if args.stage == 1 else args.image_mode,
                            projector_type=args.projector_type, image_grid_pinpoints=args.image_grid_pinpoints,
                            image_pooling=args.image_pooling)
    for name, p in model.named_parameters():
        group = param_group(name)
        p.requires_grad_(group == "projector" or (args.stage == 2 and group == "llm" and not args.lora)
                         or (args.train_vision_tower and group == "vision_tower"))
    if args.lora:
        add_lora(model, args.lora_r, args.lora_alpha)    # new adapters, trainable, in the "llm" group
    model.gradient_checkpointing = args.grad_checkpointing
    return model.train()


def shard(model, args, device):
    """ZeRO-3 over the ranks with the same units for both engines: each LLM decoder block and each
    vision block; the root holds the rest. nanollava's FSDP returns its object (it owns the
    root's gradient reduction); FSDP2 shards the model in place (None)."""
    units = list(model.language_model.model.layers) + list(model.vision_tower.vision_model.encoder.layers)
    param_dtype = getattr(torch, args.dtype)
    if args.fsdp == "nano":
        return PrefetchFSDP(model, units, group_fn=param_group, param_dtype=param_dtype, device=device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in units + [model]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    return None


def make_optimizer(model, args):
    """AdamW over the trainable parameters as the engine holds them (nanollava's flat shards,
    FSDP2's DTensors), one param group per learning rate: projector, LLM, vision tower."""
    lrs = {"projector": args.projector_lr or args.lr, "llm": args.lr, "vision_tower": args.vision_lr}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(param_group(name), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lrs[g], "name": g} for g, ps in groups.items()],
                             betas=args.betas, weight_decay=args.weight_decay, eps=args.eps)


@torch.no_grad()
def clip_grad_norm_(params, max_norm):
    """torch's clip_grad_norm_ over sharded gradients: the global L2 norm is the square root of
    the all-reduced sums of squares of every rank's shards."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), device=params[0].device)
    for g in grads:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
    return norm


def local_bytes(params, optimizer):
    """Bytes this rank holds of the sharded training state: master weights, gradients, AdamW."""
    n = 0
    for p in params:
        for t in (p, p.grad, *optimizer.state.get(p, {}).values()):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                n += local(t).numel() * local(t).element_size()
    return n


def data_steps(dataset, lengths, args, rank, world, position, pad_id):
    """(epoch, global batches done in it, this rank's micro-batches of the step), step after step
    from position = (epoch, global batches done): the resumable data order. Every global batch is
    the same set of samples whatever the world size and micro-batch (data.global_batches)."""
    epoch, done = position
    accum = args.global_batch // (args.micro_batch * world)
    while True:
        batches = global_batches(lengths, args.global_batch, args.seed, epoch, args.group_by_length)
        micro = [m for b in batches[done:] for m in rank_micro_batches(b, world, rank, args.micro_batch)]
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=micro, num_workers=args.num_workers,
                                                  collate_fn=partial(collate, pad_id=pad_id),
                                                  worker_init_fn=ignore_sigint))
        for k in range(done, len(batches)):
            yield epoch, k + 1, [next(loader) for _ in range(accum)]
        epoch, done = epoch + 1, 0


# ---- save: the trained model, whole --------------------------------------------------------

def full_state_dict(model, fsdp, keep=True):
    """Every weight whole, fp32, on CPU (all ranks take part in the gathers; only where keep, one
    copy is held: not 8 copies of a 7B model's weights in host memory)."""
    if fsdp is not None:
        sd = fsdp.full_state_dict(keep)
    else:
        sd = {}
        for n, p in model.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p      # a collective: every rank
            if keep:
                sd[n] = t
    return {n: t.detach().float().cpu() for n, t in sd.items()}


def export(model, fsdp, args, master_process):
    """Stage 1: the projector (safetensors and the original's .bin); stage 2: OUT/final in the
    llava-hf layout, LoRA adapters merged in (and OUT/adapters.safetensors: the adapters and the
    projector alone)."""
    sd = full_state_dict(model, fsdp, keep=master_process)
    if not master_process:
        return
    plain = build(model.config)                          # the unsharded model, on the meta device
    if args.lora:
        add_lora(plain, args.lora_r, args.lora_alpha)
    plain.load_state_dict(sd, assign=True)
    if args.stage == 1:
        save_projector(plain, os.path.join(args.out, "mm_projector.safetensors"))
        save_original_projector(plain, os.path.join(args.out, "mm_projector.bin"))
        return
    if args.lora:
        save_adapters(plain, os.path.join(args.out, "adapters.safetensors"))
        merge_lora(plain)
    final = os.path.join(args.out, "final")
    plain.save_pretrained(final)
    shutil.copy(find_tokenizer(args), os.path.join(final, "tokenizer.json"))


def save_original_projector(model, path):
    """Stage-1 output in the original LLaVA format: `model.mm_projector.{0,2}.{weight,bias}`."""
    proj = model.multi_modal_projector
    names = {"linear_1": "0", "linear_2": "2"}
    state = {f"model.mm_projector.{names[k.split('.')[0]]}.{k.split('.')[1]}": v.detach().cpu().clone()
             for k, v in proj.state_dict().items()}
    if getattr(model, "image_newline", None) is not None:
        state["model.image_newline"] = model.image_newline.detach().cpu().clone()
    with files.atomic_write(path, "wb") as f:   # written for the original code; nanollava reads the
        torch.save(state, f)                     # .safetensors twin (or a .bin with weights_only=True)


# ---- metrics --------------------------------------------------------------------------------

def flops_per_token(model_numel, llm_numel, trainable_numel):
    """Forward 2N over everything, backward 2N for input grads through the LLM (the projector sits
    below it) + 2N for the trainable weights' grads (attention's T^2 term left out)."""
    return 2 * model_numel + 2 * llm_numel + 2 * trainable_numel


# dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's datasheets; the first name
# that torch.cuda.get_device_name() contains wins, so the specific variants come first
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),     # H100 SXM
    ("H200 NVL", 835e12), ("H200", 989e12),                             # H200 SXM, GH200
    ("A100", 312e12),                                                   # SXM and PCIe
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("4090", 165e12),                                                   # GeForce: fp32 accumulate
)


def peak_flops(gpu_name):
    """Dense bf16 peak FLOP/s of a GPU, by its CUDA device name (for MFU); None when unknown."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in gpu_name), None)


def elapsed(t0, device):
    """Seconds since t0, once the GPU has finished the work queued so far: CUDA kernels run
    asynchronously, so without the sync a step's time would end before its last backward,
    clip and optimizer step, and tokens/s and MFU would read high."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - t0


def memory_string(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GiB rss"


# ---- faults: signals, a dead launcher, skipped records ---------------------------------------

class Stopped(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum                   # the shell's convention: 130 Ctrl-C, 143 SIGTERM


class StopSignals:
    """While active, SIGINT/SIGTERM only set `signum`: the loop finishes its step, checkpoints and
    stops. A second Ctrl-C aborts at once (no checkpoint)."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_sigint(worker_id):
    """DataLoader workers: Ctrl-C reaches the whole process group; the main process handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_with_launcher():
    """A torchrun worker whose launcher dies is reparented and would train on as an orphan: watch
    the parent and take the SIGTERM path (finish the step, checkpoint, exit) when it changes."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


SKIP_KINDS = ("FileNotFoundError", "ValueError", "OSError", "MemoryError")


def sync_step(loss_sum, tokens, stop, skips):
    """One all-reduce per step: the loss sum, the tokens, "any rank was signalled", and the records
    every rank skipped this step, by kind (SKIP_KINDS)."""
    stats = torch.stack([loss_sum, tokens, torch.tensor(float(stop), device=tokens.device),
                         *[torch.tensor(float(skips.get(k, 0)), device=tokens.device) for k in SKIP_KINDS]])
    dist.all_reduce(stats)
    return stats[0], stats[1], bool(stats[2] > 0), {k: int(n) for k, n in zip(SKIP_KINDS, stats[3:]) if n}


def read_metrics(path, step):
    """metrics.jsonl lines up to `step` (the checkpoint resumed from): later steps are redone, and
    a torn line (a kill or a full disk mid-write) is dropped."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                print(f"warning: {path}, line {i}: dropping a torn or malformed line", file=sys.stderr)
    return kept


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
    """Parse the command line; rank 0 holds OUT's lock for the whole run."""
    args = parse_args(argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with files.locked(args.out) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
            run(args)
    finally:
        for s, handler in handlers.items():              # also when run() raised mid-loop
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = run_config(args)
    try:                                                 # bad input fails here, before any work
        check_inputs(args, world)
        resume = train_checkpoint.find(args.out, config, DEFAULTS) if args.resume else None
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from e

    # ---- init
    device = init_distributed(args)
    rank = dist.get_rank()
    master_process = rank == 0
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)                         # same on every rank: identical fresh weights
    accum = args.global_batch // (args.micro_batch * world)
    tok = Tokenizer.from_file(find_tokenizer(args))
    model = build_model(args, tok, device)
    model_numel = sum(p.numel() for p in model.parameters())
    llm_numel = sum(p.numel() for p in model.language_model.parameters())
    trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fsdp = shard(model, args, device)
    optimizer = make_optimizer(model, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    pieces, weights = train_checkpoint.pieces(model, fsdp)   # what a checkpoint holds of this rank

    try:                                                 # a malformed data file: a clear error too
        mode = args.image_mode or VISION_TOWER_DEFAULTS[model.config.vision.model_type]["processor_mode"]
        dataset = LLaVADataset(args.data, args.image_folder, tok, model.config, template=args.template,
                               max_length=args.max_length, mode=mode)
        steps_per_epoch = len(dataset) // args.global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{args.data}: {len(dataset)} samples are fewer than one global batch "
                             f"of {args.global_batch}")
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from e
    total_steps = args.schedule_steps or steps_per_epoch * args.epochs
    max_steps = min(args.max_steps or total_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, total=total_steps, warmup_ratio=args.warmup_ratio))

    step, position = 0, (0, 0)                           # position: (epoch, global batches done in it)
    skipped = Counter()                                  # records skipped so far, all ranks, by kind
    if resume is not None:
        ckpt_dir, meta = resume
        try:
            train_checkpoint.load(ckpt_dir, meta, pieces, weights, optimizer, scheduler)
        except ValueError as e:
            raise BadInput(str(e)) from e
        step, position = meta["step"], (meta["data"]["epoch"], meta["data"]["batch"])
        skipped.update(meta["data"].get("skipped", {}))
    saved_step = step if resume is not None else None
    if master_process:
        os.makedirs(args.out, exist_ok=True)
        metrics_path = os.path.join(args.out, "metrics.jsonl")
        kept = read_metrics(metrics_path, step) if resume is not None and os.path.exists(metrics_path) else []
        with files.atomic_write(metrics_path) as f:
            f.writelines(kept)
        print(f"stage {args.stage}: {trainable_numel:,} of {model_numel:,} params trainable"
              f"{' (LoRA)' if args.lora else ''}, {world} rank(s), --fsdp {args.fsdp}, global batch "
              f"{args.global_batch} = {args.micro_batch} x {world} x {accum} accumulation, {total_steps} "
              f"scheduled steps, {len(dataset)} samples, sharded bytes/rank {local_bytes(params, optimizer):,}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    fpt = flops_per_token(model_numel, llm_numel, trainable_numel)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    data = data_steps(dataset, dataset.lengths, args, rank, world, position, tok.pad_id)
    bar = tqdm(total=max_steps, initial=step, disable=not master_process, desc=f"stage {args.stage}",
               dynamic_ncols=True)
    t_start, steps_done = time.time(), 0
    stop = StopSignals()
    while step < max_steps:
        t0 = time.time()
        try:
            epoch, batch, micro_batches = next(data)
        except DataError as e:                           # from a worker: the message ends in ours
            raise BadInput(str(e).strip().splitlines()[-1].split("DataError: ")[-1]) from e
        step_skips = Counter()
        for b in micro_batches:
            step_skips.update(b.pop("skipped"))
        micro_batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                         for b in micro_batches]
        # the step's loss: the sum of the global batch's token losses over its count of
        # supervised tokens, so that neither the world size nor the micro-batch changes it
        n_supervised = torch.stack([supervised_tokens(b["labels"]) for b in micro_batches]).sum().float()
        dist.all_reduce(n_supervised)
        n_supervised = n_supervised.clamp(min=1)
        loss_sum = torch.zeros((), device=device)
        tokens = torch.zeros((), device=device)
        for b in micro_batches:
            with autocast:
                loss = model.loss(b["input_ids"], b["labels"], b["pixel_values"], b["image_sizes"],
                                  b["attention_mask"], reduction="sum")
            (loss * world / n_supervised).backward()     # x world: FSDP averages the ranks' gradients
            loss_sum += loss.detach()
            tokens += b["attention_mask"].sum()
        if fsdp is not None:
            fsdp.reduce_grads()                          # nanollava's FSDP: the root's gradients
        grad_norm = clip_grad_norm_(params, args.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        sharded_bytes = local_bytes(params, optimizer)   # master shards + grads + AdamW, this rank
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum, tokens, stopping, step_skips = sync_step(loss_sum, tokens, stop.signum is not None, step_skips)
        skipped.update(step_skips)
        dt = elapsed(t0, device)
        steps_done += 1
        if master_process:
            tok_s = tokens.item() / dt
            rec = {"step": step, "loss": round((loss_sum / n_supervised).item(), 6), "lr": lr,
                   "tokens_per_s": round(tok_s, 1), "grad_norm": round(grad_norm.item(), 4), "dt": round(dt, 4),
                   "fsdp_bytes": sharded_bytes, "skipped": sum(skipped.values()), "skipped_by_kind": dict(skipped)}
            mfu = fpt * tok_s / (peak * world) if peak else None
            if mfu is not None:
                rec["mfu"] = round(mfu, 4)
            files.append_line(metrics_path, json.dumps(rec))
            bar.update(1)
            if step % args.log_every == 0 or step == max_steps:
                eta = (time.time() - t_start) / steps_done * (max_steps - step)
                tqdm.write(f"step {step}/{max_steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                           f"gnorm {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s"
                           + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                           + f" | mem {memory_string(device)} | eta {eta:.0f}s"
                           + (f" | skipped {sum(skipped.values())}" if skipped else ""))
        if ((args.save_every and step % args.save_every == 0) or step == max_steps or stopping) \
                and step != saved_step:
            train_checkpoint.save(args.out, step, pieces, weights, optimizer, scheduler,
                                  {"epoch": epoch, "batch": batch, "skipped": dict(skipped)}, config, args.keep_last)
            saved_step = step
        if stopping and step < max_steps:               # (a signal in the last step: just finish)
            bar.close()
            name = signal.Signals(stop.signum or signal.SIGTERM).name
            raise Stopped(f"stopped by {name} at step {step}/{max_steps}; checkpoint "
                          f"{os.path.join(args.out, 'ckpt', f'step_{step:07d}')}; "
                          f"to continue, rerun the same command with --resume", stop.signum or signal.SIGTERM)
    stop.restore()
    bar.close()

    # ---- save
    export(model, fsdp, args, master_process)
    if master_process:
        with open(metrics_path) as f:
            records = [json.loads(l) for l in f]
        if records:
            from nanollava import plots
            plots.training_curves(records, os.path.join(args.out, "loss.png"), f"stage {args.stage}")
        print(f"done: {args.out}" + ("" if args.stage == 1 else f" (model: {args.out}/final)"))


if __name__ == "__main__":
    try:
        main()
    except (BadInput, files.Busy, files.WriteError) as e:    # one clear line, no stack trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
