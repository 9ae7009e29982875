"""Train LLaVA-1.5 in two stages (Liu et al., "Improved Baselines with Visual Instruction Tuning" §4).

  stage 1 (feature alignment): CLIP and the LLM frozen, only the projector learns, on image
          captions with the `plain` template (lr 1e-3, global batch 256). Saves the projector
          alone: OUT/mm_projector.safetensors and the original-style OUT/mm_projector.bin.
  stage 2 (visual instruction tuning): starts from the stage-1 projector (--stage1-out) and
          trains projector + LLM on conversations with `vicuna_v1` (lr 2e-5, global batch 128);
          --train-vision-tower also tunes CLIP at its own lr (LLaVA-NeXT: 2e-6). Exports
          OUT/final in the llava-hf layout (sample.py / eval.py / transformers load it).

Both: AdamW (0.9, 0.999), weight decay 0, cosine schedule with 3% linear warmup, one epoch,
gradient accumulation up to the global batch whatever the world size, bf16 autocast on CUDA
with fp32 master weights, hand-rolled FSDP (nanollava/fsdp.py) over torchrun ranks.

  python train.py --stage 1                       # the toy: runs on a laptop CPU
  python train.py --stage 2
  torchrun --nproc_per_node 8 train.py --stage 2 --vision-tower clip-vit-large-patch14-336 \\
      --llm vicuna-7b-v1.5 --data llava_v1_5_mix665k.json --image-folder data --device cuda \\
      --micro-batch 16 --max-length 2048 --grad-checkpointing

Writes OUT/metrics.jsonl (one JSON per optimizer step), OUT/loss.png, sharded checkpoints in
OUT/ckpt/step_N/ (the last complete one is named by OUT/ckpt/latest) and resumes with --resume.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanollava import toy
from nanollava.checkpoint import load_from_parts, save_projector
from nanollava.data import LLaVADataset, LengthGroupedSampler, collate
from nanollava.fsdp import FSDP
from nanollava.tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------
# defaults: the toy (data_prep.py + pretrain_toy.py outputs); LLaVA-1.5 recipe per stage
STAGES = {
    1: dict(template="plain", image_mode="crop", lr=1e-3, global_batch=256, data="stage1.json", group_by_length=False),
    2: dict(template="vicuna_v1", image_mode="pad", lr=2e-5, global_batch=128, data="stage2.json", group_by_length=True),
}
vision_tower = toy.CLIP_DIR
llm = toy.LLAMA_DIR
data_dir = toy.DATA_DIR
micro_batch = 16            # per rank per forward; accumulation makes up the global batch
max_length = 2048           # LLaVA-1.5 (NeXT: 4096)
epochs = 1                  # the recipe: one epoch per stage
warmup_ratio = 0.03
vision_lr = 2e-6            # LLaVA-NeXT's unfrozen tower
betas = (0.9, 0.999)
weight_decay = 0.0
grad_clip = 1.0             # HF Trainer's default max_grad_norm, which LLaVA inherits
seed = 1337
log_every = 1
# -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LLaVA-1.5 stage 1 / stage 2 training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: projector on captions; 2: + LLM")
    p.add_argument("--vision-tower", default=vision_tower, help="CLIP vision directory (HF layout)")
    p.add_argument("--llm", default=llm, help="Llama/Vicuna directory (HF layout)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: LLM/tokenizer.json, else DATA dir's)")
    p.add_argument("--data", default=None, help=f"LLaVA JSON (default: {data_dir}/stage{{1,2}}.json)")
    p.add_argument("--image-folder", default=None, help=f"image root (default: {data_dir}/images)")
    p.add_argument("--stage1-out", default="out/stage1", help="stage 2: the stage-1 OUT dir or projector file")
    p.add_argument("--out", default=None, help="output directory (default: out/stage{1,2})")
    p.add_argument("--lr", type=float, default=None, help="peak lr of projector + LLM (default 1e-3 / 2e-5)")
    p.add_argument("--train-vision-tower", action="store_true", help="stage 2: also tune CLIP (LLaVA-NeXT)")
    p.add_argument("--vision-lr", type=float, default=vision_lr, help="peak lr of the vision tower")
    p.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (default 256 / 128)")
    p.add_argument("--micro-batch", type=int, default=micro_batch, help="samples per rank per forward")
    p.add_argument("--max-length", type=int, default=max_length, help="max tokens per sample (images kept whole)")
    p.add_argument("--epochs", type=int, default=epochs, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (schedule unchanged)")
    p.add_argument("--schedule-steps", type=int, default=None, help="length of the lr schedule (default: epochs)")
    p.add_argument("--warmup-ratio", type=float, default=warmup_ratio, help="linear warmup fraction")
    p.add_argument("--grad-clip", type=float, default=grad_clip, help="global grad-norm clip (0: off)")
    p.add_argument("--grad-checkpointing", action="store_true", help="per-block activation checkpointing")
    p.add_argument("--no-group-by-length", action="store_true",
                   help="stage 2: plain shuffle instead of LLaVA's group_by_modality_length (stage 1 never groups)")
    p.add_argument("--save-every", type=int, default=0, help="sharded checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt/latest")
    p.add_argument("--seed", type=int, default=seed, help="model init, data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--log-every", type=int, default=log_every, help="print a step line every N steps")
    args = p.parse_args(argv)
    stage = STAGES[args.stage]
    args.template, args.image_mode = stage["template"], stage["image_mode"]
    args.group_by_length = stage["group_by_length"] and not args.no_group_by_length
    args.lr = stage["lr"] if args.lr is None else args.lr
    args.global_batch = args.global_batch or stage["global_batch"]
    args.data = args.data or os.path.join(data_dir, stage["data"])
    args.image_folder = args.image_folder or os.path.join(data_dir, "images")
    args.out = args.out or f"out/stage{args.stage}"
    return args


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
    if args.train_vision_tower and args.stage == 1:
        raise ValueError("--train-vision-tower is a stage-2 option (stage 1 trains the projector only)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU")
    if args.stage == 2:
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
    """Per-parameter-group learning rates: projector / LLM / vision tower."""
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


def run_config(args, world):
    """What a checkpoint must agree with to be resumed."""
    keys = ("stage", "vision_tower", "llm", "data", "global_batch", "micro_batch", "max_length", "lr",
            "train_vision_tower", "vision_lr", "seed", "schedule_steps", "epochs", "warmup_ratio",
            "group_by_length")
    return dict({k: getattr(args, k) for k in keys}, world=world)


class BadInput(Exception):
    """A bad command line / path / checkpoint, found before any work."""


# ---- checkpoints ----------------------------------------------------------------------------

def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(out, step, fsdp, optimizer, scheduler, data_state, config, rank, world):
    """Sharded: OUT/ckpt/step_N/rank{r}.pt per rank; OUT/ckpt/latest is switched atomically only once
    every rank's file is complete, so an interrupted write leaves the previous checkpoint in use."""
    ckpt_dir = os.path.join(out, "ckpt", f"step_{step:07d}")
    os.makedirs(ckpt_dir, exist_ok=True)
    _atomic_save({"model": fsdp.sharded_state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(),
                  "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                          "torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}},
                 os.path.join(ckpt_dir, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        meta = {"step": step, "data": data_state, "config": config, "layout": fsdp.layout()}
        with open(os.path.join(ckpt_dir, "meta.json.tmp"), "w") as f:
            json.dump(meta, f)
        os.replace(os.path.join(ckpt_dir, "meta.json.tmp"), os.path.join(ckpt_dir, "meta.json"))
        latest = os.path.join(out, "ckpt", "latest")
        with open(latest + ".tmp", "w") as f:
            f.write(os.path.basename(ckpt_dir))
        os.replace(latest + ".tmp", latest)                # the commit point
        for old in os.listdir(os.path.join(out, "ckpt")):  # keep only the committed checkpoint
            if old.startswith("step_") and old != os.path.basename(ckpt_dir):
                shutil.rmtree(os.path.join(out, "ckpt", old), ignore_errors=True)
    if world > 1:
        dist.barrier()


def read_checkpoint_meta(out, config):
    """meta.json of OUT/ckpt/latest, checked against this run's config (before any work)."""
    latest = os.path.join(out, "ckpt", "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, 'ckpt')} (no 'latest' file)")
    ckpt_dir = os.path.join(out, "ckpt", open(latest).read().strip())
    with open(os.path.join(ckpt_dir, "meta.json")) as f:
        meta = json.load(f)
    diff = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"--resume: the checkpoint in {ckpt_dir} is from another configuration ({lines})")
    return ckpt_dir, meta


def load_checkpoint(ckpt_dir, meta, fsdp, optimizer, scheduler, rank):
    if meta["layout"] != json.loads(json.dumps(fsdp.layout())):
        raise ValueError(f"--resume: {ckpt_dir} was written for another model/parameter layout")
    state = torch.load(os.path.join(ckpt_dir, f"rank{rank}.pt"), weights_only=False)
    fsdp.load_sharded_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])       # also restores each group's current lr
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def save_original_projector(model, path):
    """Stage-1 output in the original LLaVA format: `model.mm_projector.{0,2}.{weight,bias}`."""
    proj = model.multi_modal_projector
    names = {"linear_1": "0", "linear_2": "2"}
    state = {f"model.mm_projector.{names[k.split('.')[0]]}.{k.split('.')[1]}": v.detach().cpu().clone()
             for k, v in proj.state_dict().items()}
    if getattr(model, "image_newline", None) is not None:
        state["model.image_newline"] = model.image_newline.detach().cpu().clone()
    _atomic_save(state, path)


def draw_loss_curve(steps, losses, path, title):
    """A small loss-vs-step PNG with Pillow (no matplotlib dependency)."""
    from PIL import Image, ImageDraw
    W, H, m = 640, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, W - m // 2, H - m], outline="black")
    if len(losses) >= 1:
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-6
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        pts = [(m + (s - s0) / (s1 - s0) * (W - 1.5 * m), H - m - (l - lo) / (hi - lo) * (H - 1.5 * m))
               for s, l in zip(steps, losses)]
        d.line(pts, fill="blue", width=2) if len(pts) > 1 else d.ellipse([pts[0][0] - 2, pts[0][1] - 2,
                                                                           pts[0][0] + 2, pts[0][1] + 2], fill="blue")
        d.text((5, m // 2), f"{hi:.3f}", fill="black")
        d.text((5, H - m - 10), f"{lo:.3f}", fill="black")
        d.text((m, H - m + 5), f"step {s0}", fill="black")
        d.text((W - 2 * m, H - m + 5), f"step {steps[-1]}", fill="black")
    d.text((m, 5), title, fill="black")
    img.save(path)


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


def no_image_term(model, device):
    """0 x the tower + projector on one zero image, added to the loss of a micro-batch without
    images (as the original LLaVA feeds text-only samples a zero image): every rank then runs
    the same FSDP units and collectives whatever its micro-batch holds. It runs before the
    model's own forward, as the tower does for images, so backward visits the units in the same
    order on every rank."""
    S = model.config.vision.image_size
    term = 0 * model.project_images(torch.zeros(1, 3, S, S, device=device)).sum()
    if getattr(model, "image_newline", None) is not None:              # AnyRes
        term = term + 0 * model.image_newline.sum()
    return term


def memory_string(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GiB rss"


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = world > 1
    config = run_config(args, world)
    try:                                                 # bad input fails here, before any work
        check_inputs(args, world)
        resume = read_checkpoint_meta(args.out, config) if args.resume else None
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from e

    # ---- init
    if ddp:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if ddp else 0
    master_process = rank == 0
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)                         # same on every rank: identical fresh projector
    accum = args.global_batch // (args.micro_batch * world)

    tok = Tokenizer.from_file(find_tokenizer(args))
    projector = stage1_projector(args.stage1_out) if args.stage == 2 else None
    model = load_from_parts(args.vision_tower, args.llm, projector=projector, device=device,
                                  image_token_id=tok.image_token_id, template="vicuna_v1")
    # freezing: stage 1 = projector only; stage 2 = projector + LLM (+ tower if asked)
    for name, p in model.named_parameters():
        group = param_group(name)
        p.requires_grad_(group == "projector" or (args.stage == 2 and group == "llm")
                         or (args.train_vision_tower and group == "vision_tower"))
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    model_numel = sum(p.numel() for p in model.parameters())
    llm_numel = sum(p.numel() for p in model.language_model.parameters())
    trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # FSDP units: each LLM decoder block and each CLIP block; the rest is the always-gathered root
    units = list(model.language_model.model.layers) + list(model.vision_tower.vision_model.encoder.layers)
    fsdp = FSDP(model, units, group_fn=param_group, device=device)
    lrs = {"projector": args.lr, "llm": args.lr, "vision_tower": args.vision_lr}
    optimizer = fsdp.optimizer(lrs, betas=betas, weight_decay=weight_decay, eps=1e-8)

    try:                                                 # a malformed data file: a clear error too
        dataset = LLaVADataset(args.data, args.image_folder, tok, model.config, template=args.template,
                               max_length=args.max_length, mode=args.image_mode)
        sampler = LengthGroupedSampler(dataset.lengths, args.micro_batch, world, rank, seed=args.seed,
                                       group_by_length=args.group_by_length)
        steps_per_epoch = len(sampler) // args.micro_batch // accum
        if steps_per_epoch == 0:
            raise ValueError(f"{args.data}: {len(dataset)} samples are fewer than one global batch "
                             f"of {args.global_batch}")
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from e
    total_steps = args.schedule_steps or steps_per_epoch * args.epochs
    max_steps = min(args.max_steps or total_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, total=total_steps, warmup_ratio=args.warmup_ratio))

    step, epoch, micro_pos = 0, 0, 0                      # micro_pos: micro-batches used this epoch
    if resume is not None:
        ckpt_dir, meta = resume
        load_checkpoint(ckpt_dir, meta, fsdp, optimizer, scheduler, rank)
        step, epoch, micro_pos = meta["step"], meta["data"]["epoch"], meta["data"]["micro_pos"]
    if master_process:
        os.makedirs(args.out, exist_ok=True)
        metrics_path = os.path.join(args.out, "metrics.jsonl")
        kept = []
        if resume is not None and os.path.exists(metrics_path):   # drop steps past the checkpoint
            kept = [l for l in open(metrics_path) if json.loads(l)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
        print(f"stage {args.stage}: {trainable_numel:,} of {model_numel:,} params trainable, {world} rank(s), "
              f"global batch {args.global_batch} = {args.micro_batch} x {world} x {accum} accumulation, "
              f"{total_steps} scheduled steps, {len(dataset)} samples, FSDP bytes/rank {fsdp.local_bytes():,}")

    def micro_batches():
        """Micro-batches across epochs, starting at (epoch, micro_pos): the resumable data order."""
        nonlocal epoch, micro_pos
        while True:
            sampler.set_epoch(epoch, start_index=micro_pos * args.micro_batch)
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, sampler=sampler,
                                                 collate_fn=partial(collate, pad_id=tok.pad_id),
                                                 num_workers=args.num_workers, drop_last=True)
            for batch in loader:
                micro_pos += 1
                yield batch
            epoch, micro_pos = epoch + 1, 0

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    fpt = flops_per_token(model_numel, llm_numel, trainable_numel)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    batches = micro_batches()
    bar = tqdm(total=max_steps, initial=step, disable=not master_process, desc=f"stage {args.stage}",
               dynamic_ncols=True)
    t_start, steps_done = time.time(), 0
    while step < max_steps:
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        tokens = torch.zeros((), device=device)
        for _ in range(accum):
            batch = next(batches)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast:
                extra = no_image_term(model, device) if batch["pixel_values"] is None else 0
                loss = model.loss(batch["input_ids"], batch["labels"], batch["pixel_values"],
                                  batch["image_sizes"], batch["attention_mask"])
            ((loss + extra) / accum).backward()
            loss_sum += loss.detach() / accum
            tokens += batch["attention_mask"].sum()
        grad_norm = fsdp.clip_grad_norm_(args.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        fsdp_bytes = fsdp.local_bytes(optimizer)         # master shards + grads + AdamW, this rank
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ddp:
            stats = torch.stack([loss_sum, tokens])
            dist.all_reduce(stats)
            loss_sum, tokens = stats[0] / world, stats[1]
        dt = elapsed(t0, device)
        steps_done += 1
        if master_process:
            tok_s = tokens.item() / dt
            rec = {"step": step, "loss": round(loss_sum.item(), 6), "lr": lr, "tokens_per_s": round(tok_s, 1),
                   "grad_norm": round(grad_norm.item(), 4), "dt": round(dt, 4), "fsdp_bytes": fsdp_bytes}
            mfu = fpt * tok_s / (peak * world) if peak else None
            if mfu is not None:
                rec["mfu"] = round(mfu, 4)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
            if step % args.log_every == 0 or step == max_steps:
                eta = (time.time() - t_start) / steps_done * (max_steps - step)
                tqdm.write(f"step {step}/{max_steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                           f"gnorm {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s"
                           + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                           + f" | mem {memory_string(device)} | eta {eta:.0f}s")
        if (args.save_every and step % args.save_every == 0) or step == max_steps:
            save_checkpoint(args.out, step, fsdp, optimizer, scheduler, {"epoch": epoch, "micro_pos": micro_pos},
                            config, rank, world)
    bar.close()

    # ---- export: consolidate the shards into a plain model
    model = fsdp.unwrap()
    if master_process:
        if args.stage == 1:
            save_projector(model, os.path.join(args.out, "mm_projector.safetensors"))
            save_original_projector(model, os.path.join(args.out, "mm_projector.bin"))
        else:
            final = os.path.join(args.out, "final")
            model.save_pretrained(final)
            shutil.copy(find_tokenizer(args), os.path.join(final, "tokenizer.json"))
        records = [json.loads(l) for l in open(metrics_path)]
        if records:
            draw_loss_curve([r["step"] for r in records], [r["loss"] for r in records],
                            os.path.join(args.out, "loss.png"), f"stage {args.stage} loss")
        print(f"done: {args.out}" + ("" if args.stage == 1 else f" (model: {args.out}/final)"))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:                             # bad input: one clear line, no stack trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
