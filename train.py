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
import re
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
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nanollava import files, toy
from nanollava.checkpoint import VISION_TOWER_DEFAULTS, load_from_parts, save_projector
from nanollava.conversation import TEMPLATES
from nanollava.cli import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from nanollava.data import DataError, LLaVADataset, LengthGroupedSampler, collate, load_json_object
from nanollava.fsdp import FSDP
from nanollava.tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------
# defaults: the toy (data_prep.py + pretrain_toy.py outputs); LLaVA-1.5 recipe per stage
STAGES = {   # image_mode None: the vision tower's own processor (CLIP: crop, SigLIP: squash)
    1: dict(template="plain", image_mode=None, lr=1e-3, global_batch=256, data="stage1.json", group_by_length=False),
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
keep_last = 2               # checkpoints kept: the newest, and one to fall back on if it is damaged
dist_timeout = 600          # seconds a rank waits in a collective before the run fails (torch: 30 min)
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
    p.add_argument("--lr", type=positive_float, default=None, help="peak lr of projector + LLM (default 1e-3 / 2e-5)")
    p.add_argument("--train-vision-tower", action="store_true", help="stage 2: also tune CLIP (LLaVA-NeXT)")
    p.add_argument("--vision-lr", type=positive_float, default=vision_lr, help="peak lr of the vision tower")
    p.add_argument("--global-batch", type=positive_int, default=None, help="samples per optimizer step (default 256 / 128)")
    p.add_argument("--micro-batch", type=positive_int, default=micro_batch, help="samples per rank per forward")
    p.add_argument("--max-length", type=positive_int, default=max_length, help="max tokens per sample (images kept whole)")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps (schedule unchanged)")
    p.add_argument("--schedule-steps", type=positive_int, default=None, help="length of the lr schedule (default: epochs)")
    p.add_argument("--warmup-ratio", type=fraction, default=warmup_ratio, help="linear warmup fraction")
    p.add_argument("--grad-clip", type=non_negative_float, default=grad_clip, help="global grad-norm clip (0: off)")
    p.add_argument("--grad-checkpointing", action="store_true", help="per-block activation checkpointing")
    p.add_argument("--no-group-by-length", action="store_true",
                   help="stage 2: plain shuffle instead of LLaVA's group_by_modality_length (stage 1 never groups)")
    p.add_argument("--save-every", type=non_negative_int, default=0,
                   help="sharded checkpoint every N steps (0: only at the end, on Ctrl-C and on SIGTERM)")
    p.add_argument("--keep-last", type=positive_int, default=keep_last,
                   help="checkpoints kept (older ones are deleted once a newer one is complete)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt/latest (or the newest older one if it is damaged)")
    p.add_argument("--seed", type=int, default=seed, help="model init, data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--log-every", type=positive_int, default=log_every, help="print a step line every N steps")
    p.add_argument("--dist-timeout", type=positive_float, default=dist_timeout,
                   help="seconds a rank waits for the others in a collective before the run fails")
    p.add_argument("--template", choices=[t for t in TEMPLATES if t != "plain"], default=None,
                   help="stage 2 conversation template (default vicuna_v1; e.g. mistral_instruct, qwen_1_5 "
                        "for the LLM's own chat format); stage 1 is always plain")
    p.add_argument("--image-mode", choices=("crop", "pad", "squash", "anyres"), default=None,
                   help="image preprocessing (default: stage 1 the tower's own, crop for CLIP and squash for "
                        "SigLIP; stage 2 pad, LLaVA-1.5's)")
    args = p.parse_args(argv)
    stage = STAGES[args.stage]
    args.template = "plain" if args.stage == 1 else args.template or stage["template"]
    args.image_mode = args.image_mode or stage["image_mode"]
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
            "group_by_length", "template", "image_mode")
    return dict({k: getattr(args, k) for k in keys}, world=world)


class BadInput(Exception):
    """A bad command line / path / checkpoint, found before any work."""


# ---- checkpoints ----------------------------------------------------------------------------
# OUT/ckpt/step_N/rank{r}.safetensors  rank r's master shards ("model.*"), AdamW state
#                                      ("optimizer.<param>.<name>") and RNG states ("rng.*") as
#                                      tensors; optimizer param groups, scheduler and the Python /
#                                      NumPy RNG as JSON in the file's metadata. No pickle anywhere:
#                                      a planted or tampered file is refused, never executed.
# OUT/ckpt/step_N/meta.json            step, data position, skip counts, run config, layout.
# OUT/ckpt/latest                      the name of the newest complete checkpoint.

def training_state(fsdp, optimizer, scheduler):
    """This rank's resumable state as (tensors, JSON-able dict)."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in fsdp.sharded_state_dict().items()}
    scalars = {}
    for pid, state in opt["state"].items():
        for name, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, py_state, py_gauss = random.getstate()
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"param_groups": opt["param_groups"], "optimizer_scalars": scalars,
                     "scheduler": scheduler.state_dict(),
                     "rng": {"python": [version, list(py_state), py_gauss],
                             "numpy": [mt.tolist(), int(pos), int(has_gauss), float(gauss)]}}


def read_rank_file(path, tensors=True):
    """(tensors, state) of one rank's checkpoint file; a ValueError naming the file if it is
    missing, truncated, not safetensors (e.g. a planted pickle) or not nanollava's."""
    if not os.path.isfile(path):
        pickled = path.removesuffix(".safetensors") + ".pt"
        if os.path.isfile(pickled):
            raise ValueError(f"{pickled} is a pickle file, which nanollava never loads (unpickling runs "
                             "whatever code the file holds); this checkpoint was written by an older "
                             "nanollava or planted: start a new run")
        raise ValueError(f"{path} is missing")
    try:
        with safe_open(path, "pt") as f:
            state = json.loads((f.metadata() or {})["nanollava"])
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else None), state
    except Exception as e:  # SafetensorError (truncated, not safetensors), KeyError, JSONDecodeError
        raise ValueError(f"{path} is damaged or not a nanollava checkpoint ({type(e).__name__}: {e})") from None


def check_checkpoint(ckpt_dir):
    """meta.json of a checkpoint, once every rank file of it has been found intact (headers only)."""
    path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing")
    meta = load_json_object(path)
    for key, kind in (("step", int), ("data", dict), ("config", dict), ("layout", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(meta["data"].get(k), int) for k in ("epoch", "micro_pos")):
        raise ValueError(f"{path}: data.epoch / data.micro_pos missing or not integers")
    world = meta["layout"].get("world")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"{path}: layout.world is {world!r}, not a rank count")
    for r in range(world):
        read_rank_file(os.path.join(ckpt_dir, f"rank{r}.safetensors"), tensors=False)
    return meta


def read_checkpoint_meta(out, config):
    """(directory, meta) of the checkpoint --resume continues from, checked against this run's
    config before any work: OUT/ckpt/latest, or the newest older complete one when a file of the
    latest is damaged (with a warning). Every rank reads the same files and makes the same choice."""
    ckpt = os.path.join(out, "ckpt")
    latest = os.path.join(ckpt, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt} (no 'latest' file)")
    with open(latest) as f:
        name = f.read().strip()
    older = sorted((d for d in os.listdir(ckpt) if re.fullmatch(r"step_\d{7}", d) and d < name), reverse=True)
    problems = [] if re.fullmatch(r"step_\d{7}", name) else [f"{latest} names {name!r}, not a checkpoint"]
    for d in ([name] if not problems else []) + older:
        try:
            meta = check_checkpoint(os.path.join(ckpt, d))
        except ValueError as e:
            problems.append(str(e))
            continue
        if problems and int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: --resume: {problems[0]}; falling back to {os.path.join(ckpt, d)}", file=sys.stderr)
        diff = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--resume: the checkpoint in {os.path.join(ckpt, d)} is from another "
                             f"configuration ({lines})")
        return os.path.join(ckpt, d), meta
    raise ValueError(f"--resume: {problems[0]}; no older complete checkpoint to fall back to "
                     f"(--keep-last 2 or more keeps one)")


def save_checkpoint(out, step, fsdp, optimizer, scheduler, data_state, config, rank, world, keep_last=keep_last):
    """Every rank writes ckpt/step_N.partial/rank{r}.safetensors (tmp, fsync, rename); rank 0 then
    adds meta.json, renames the directory to step_N and switches ckpt/latest to it (the commit
    point). Only then are checkpoints beyond the newest keep_last deleted, so a crash at any moment
    leaves the previous checkpoint complete and current."""
    ckpt = os.path.join(out, "ckpt")
    name = f"step_{step:07d}"
    partial_dir = os.path.join(ckpt, name + ".partial")
    os.makedirs(partial_dir, exist_ok=True)
    tensors, state = training_state(fsdp, optimizer, scheduler)
    path = os.path.join(partial_dir, f"rank{rank}.safetensors")
    with files.replacing(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={"nanollava": json.dumps(state)})
            read_rank_file(tmp, tensors=False)            # a short write must not pass for a checkpoint
        except Exception as e:  # SafetensorError carries the I/O error (a full disk) as text
            raise OSError(str(e)) from None
    if world > 1:
        dist.barrier()
    if rank == 0:
        with files.atomic_write(os.path.join(partial_dir, "meta.json")) as f:
            json.dump({"step": step, "data": data_state, "config": config, "layout": fsdp.layout()}, f)
        final = os.path.join(ckpt, name)
        if os.path.isdir(final):                          # a damaged one --resume fell back from
            shutil.rmtree(final)
        os.replace(partial_dir, final)
        with files.atomic_write(os.path.join(ckpt, "latest")) as f:
            f.write(name)                                 # the commit point
        kept = sorted((d for d in os.listdir(ckpt) if re.fullmatch(r"step_\d{7}", d) and d < name),
                      reverse=True)[:keep_last - 1] + [name]
        for old in os.listdir(ckpt):                      # older, abandoned (> name) and partial ones
            if old.startswith("step_") and old not in kept:
                shutil.rmtree(os.path.join(ckpt, old), ignore_errors=True)
    if world > 1:
        dist.barrier()
    return os.path.join(ckpt, name)


def load_checkpoint(ckpt_dir, meta, fsdp, optimizer, scheduler, rank):
    if meta["layout"] != json.loads(json.dumps(fsdp.layout())):
        raise ValueError(f"--resume: {ckpt_dir} was written for another model/parameter layout")
    path = os.path.join(ckpt_dir, f"rank{rank}.safetensors")
    tensors, state = read_rank_file(path)
    try:
        fsdp.load_sharded_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        opt = {int(pid): dict(v) for pid, v in state["optimizer_scalars"].items()}
        for key, v in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                opt.setdefault(int(pid), {})[name] = v
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["param_groups"]]
        optimizer.load_state_dict({"state": opt, "param_groups": groups})   # also each group's current lr
        scheduler.load_state_dict(state["scheduler"])
        version, py_state, py_gauss = state["rng"]["python"]
        random.setstate((version, tuple(py_state), py_gauss))
        mt, pos, has_gauss, gauss = state["rng"]["numpy"]
        np.random.set_state(("MT19937", np.array(mt, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"--resume: {path} does not fit this run ({type(e).__name__}: {e})") from None
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


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


def sync_step(loss_sum, tokens, stop, skips, world):
    """One all-reduce per step: mean loss, total tokens, "any rank was signalled", and the records
    every rank skipped this step, by kind (SKIP_KINDS)."""
    stats = torch.stack([loss_sum, tokens, torch.tensor(float(stop), device=tokens.device),
                         *[torch.tensor(float(skips.get(k, 0)), device=tokens.device) for k in SKIP_KINDS]])
    if world > 1:
        dist.all_reduce(stats)
    return stats[0] / world, stats[1], bool(stats[2] > 0), {k: int(n) for k, n in zip(SKIP_KINDS, stats[3:]) if n}


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


def run(args):
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
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                timeout=timedelta(seconds=args.dist_timeout))
        if "TORCHELASTIC_RUN_ID" in os.environ:        # started by torchrun
            exit_with_launcher()
    rank = dist.get_rank() if ddp else 0
    master_process = rank == 0
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)                         # same on every rank: identical fresh projector
    accum = args.global_batch // (args.micro_batch * world)

    tok = Tokenizer.from_file(find_tokenizer(args))
    projector = stage1_projector(args.stage1_out) if args.stage == 2 else None
    # the exported model's template and image mode are stage 2's (stage 1 saves the projector alone)
    model = load_from_parts(args.vision_tower, args.llm, projector=projector, device=device,
                            image_token_id=tok.image_token_id, template=STAGES[2]["template"] if args.stage == 1
                            else args.template, image_aspect_ratio="pad" if args.stage == 1 else args.image_mode)
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
        mode = args.image_mode or VISION_TOWER_DEFAULTS[model.config.vision.model_type]["processor_mode"]
        dataset = LLaVADataset(args.data, args.image_folder, tok, model.config, template=args.template,
                               max_length=args.max_length, mode=mode)
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
    skipped = Counter()                                   # records skipped so far, all ranks, by kind
    if resume is not None:
        ckpt_dir, meta = resume
        try:
            load_checkpoint(ckpt_dir, meta, fsdp, optimizer, scheduler, rank)
        except ValueError as e:
            raise BadInput(str(e)) from e
        step, epoch, micro_pos = meta["step"], meta["data"]["epoch"], meta["data"]["micro_pos"]
        skipped.update(meta["data"].get("skipped", {}))
    saved_step = step if resume is not None else None
    if master_process:
        os.makedirs(args.out, exist_ok=True)
        metrics_path = os.path.join(args.out, "metrics.jsonl")
        kept = read_metrics(metrics_path, step) if resume is not None and os.path.exists(metrics_path) else []
        with files.atomic_write(metrics_path) as f:
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
                                                 num_workers=args.num_workers, drop_last=True,
                                                 worker_init_fn=ignore_sigint)
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
    stop = StopSignals()
    while step < max_steps:
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        tokens = torch.zeros((), device=device)
        step_skips = Counter()
        for _ in range(accum):
            try:
                batch = next(batches)
            except DataError as e:                       # from a worker: the message ends in ours
                raise BadInput(str(e).strip().splitlines()[-1].split("DataError: ")[-1]) from e
            step_skips.update(batch.pop("skipped"))
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
        loss_sum, tokens, stopping, step_skips = sync_step(loss_sum, tokens, stop.signum is not None, step_skips,
                                                           world)
        skipped.update(step_skips)
        dt = elapsed(t0, device)
        steps_done += 1
        if master_process:
            tok_s = tokens.item() / dt
            rec = {"step": step, "loss": round(loss_sum.item(), 6), "lr": lr, "tokens_per_s": round(tok_s, 1),
                   "grad_norm": round(grad_norm.item(), 4), "dt": round(dt, 4), "fsdp_bytes": fsdp_bytes,
                   "skipped": sum(skipped.values()), "skipped_by_kind": dict(skipped)}
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
            save_checkpoint(args.out, step, fsdp, optimizer, scheduler,
                            {"epoch": epoch, "micro_pos": micro_pos, "skipped": dict(skipped)},
                            config, rank, world, args.keep_last)
            saved_step = step
        if stopping and step < max_steps:               # (a signal in the last step: just finish)
            bar.close()
            name = signal.Signals(stop.signum or signal.SIGTERM).name
            raise Stopped(f"stopped by {name} at step {step}/{max_steps}; checkpoint "
                          f"{os.path.join(args.out, 'ckpt', f'step_{step:07d}')}; "
                          f"to continue, rerun the same command with --resume", stop.signum or signal.SIGTERM)
    stop.restore()
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
        with open(metrics_path) as f:
            records = [json.loads(l) for l in f]
        if records:
            from nanollava import plots
            plots.training_curves(records, os.path.join(args.out, "loss.png"), f"stage {args.stage}")
        print(f"done: {args.out}" + ("" if args.stage == 1 else f" (model: {args.out}/final)"))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (BadInput, files.Busy, files.WriteError) as e:    # one clear line, no stack trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
