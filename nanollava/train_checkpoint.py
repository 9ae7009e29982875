"""Sharded training checkpoints: one format for both FSDP engines and any world size.

Each rank saves its *pieces*: the elements of each trainable weight it holds, as a 1-D slice of
the weight's flattened data and where that slice starts. nanollava's FSDP holds a range of a
flat buffer (which cuts weights anywhere), PyTorch's FSDP2 holds dim-0 rows of every weight;
in both cases a piece is "weight `name`, elements [start, start + n)". A rank that resumes reads,
for each of its own pieces, the parts of the saved pieces that overlap it, from whichever rank
files hold them. So `--fsdp torch` resumes a `--fsdp nano` checkpoint and the other way round, at
the same or another world size.

    OUT/ckpt/step_N/rank{r}.safetensors  rank r's pieces: "model.<name>" (fp32 master weights),
                                         "optimizer.<name>.<exp_avg|exp_avg_sq>" (AdamW), "rng.*";
                                         JSON in the file's metadata: where each piece starts,
                                         AdamW's step per weight, the lr per parameter group, the
                                         scheduler, the Python / NumPy RNG. No pickle anywhere: a
                                         planted or tampered file is refused, never executed.
    OUT/ckpt/step_N/meta.json            step, data position, skip counts, run config, and the
                                         layout: world size and every trainable weight's shape.
    OUT/ckpt/latest                      the name of the newest complete checkpoint.
"""
import json
import math
import os
import random
import re
import shutil
import sys
from contextlib import ExitStack

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from nanollava import files
from nanollava.data import load_json_object

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def local(t):
    """The part of a (possibly DTensor) tensor that lives on this rank."""
    return t.to_local() if isinstance(t, DTensor) else t


def pieces(model, fsdp=None):
    """(this rank's pieces, {name: shape} of every trainable weight). A piece is (name, shape,
    start, param, lo, hi): elements [start, start + hi - lo) of weight `name`, flattened, are
    local(param)[lo:hi]. nanollava's FSDP says where its flat shards cut the weights; under FSDP2
    every trainable weight is a DTensor sharded on dim 0 as torch.chunk cuts it: rank r holds
    rows [r c, (r + 1) c), c = ceil(rows / world)."""
    if fsdp is not None:
        return fsdp.pieces(), {n: tuple(s) for f in fsdp.flats for n, s in zip(f.names, f.shapes)}
    out, weights = [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        weights[name] = tuple(p.shape)
        rows, world = p.shape[0], p.device_mesh.size()
        chunk = math.ceil(rows / world)
        first = min(dist.get_rank() * chunk, rows)
        if local(p).shape[0] != min(first + chunk, rows) - first:
            raise RuntimeError(f"{name}: FSDP2 no longer shards rows as torch.chunk does; update pieces()")
        if local(p).numel():
            out.append((name, tuple(p.shape), first * math.prod(p.shape[1:]), p, 0, local(p).numel()))
    return out, weights


def rank_state(pieces, optimizer, scheduler):
    """This rank's resumable state as (tensors, JSON-able dict)."""
    tensors, starts, steps = {}, {}, {}
    for name, _, start, p, lo, hi in pieces:
        tensors[f"model.{name}"] = local(p).detach().reshape(-1)[lo:hi].float().cpu().clone()
        starts[name] = start
        state = optimizer.state.get(p, {})
        if state:
            steps[name] = float(state["step"])
            for k in ADAM_STATE:
                tensors[f"optimizer.{name}.{k}"] = local(state[k]).detach().reshape(-1)[lo:hi].float().cpu().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, py_state, py_gauss = random.getstate()
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"starts": starts, "steps": steps,
                     "lrs": {g["name"]: g["lr"] for g in optimizer.param_groups},
                     "scheduler": scheduler.state_dict(),
                     "rng": {"python": [version, list(py_state), py_gauss],
                             "numpy": [mt.tolist(), int(pos), int(has_gauss), float(gauss)]}}


def read_rank_file(path, f=None):
    """The JSON state of one rank's file; a ValueError naming the file if it is missing,
    truncated, not safetensors (e.g. a planted pickle) or not nanollava's. With `f` (an open
    safe_open of it) the state is read from there."""
    if not os.path.isfile(path):
        pickled = path.removesuffix(".safetensors") + ".pt"
        if os.path.isfile(pickled):
            raise ValueError(f"{pickled} is a pickle file, which nanollava never loads (unpickling runs "
                             "whatever code the file holds); this checkpoint was written by an older "
                             "nanollava or planted: start a new run")
        raise ValueError(f"{path} is missing")
    try:
        with ExitStack() as stack:
            f = f or stack.enter_context(safe_open(path, "pt"))
            return json.loads((f.metadata() or {})["nanollava"])
    except Exception as e:  # SafetensorError (truncated, not safetensors), KeyError, JSONDecodeError
        raise ValueError(f"{path} is damaged or not a nanollava checkpoint ({type(e).__name__}: {e})") from None


def check(ckpt_dir):
    """meta.json of a checkpoint, once every rank file of it has been found intact (headers only)."""
    path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing")
    meta = load_json_object(path)
    for key, kind in (("step", int), ("data", dict), ("config", dict), ("layout", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(meta["data"].get(k), int) for k in ("epoch", "batch")):
        raise ValueError(f"{path}: data.epoch / data.batch missing or not integers")
    world = meta["layout"].get("world")
    if not isinstance(world, int) or world < 1 or not isinstance(meta["layout"].get("weights"), dict):
        raise ValueError(f"{path}: layout is {meta['layout']!r:.80}, not a world size and weight shapes")
    for r in range(world):
        read_rank_file(os.path.join(ckpt_dir, f"rank{r}.safetensors"))
    return meta


def find(out, config, defaults=None):
    """(directory, meta) of the checkpoint --resume continues from, checked against this run's
    config before any work: OUT/ckpt/latest, or the newest older complete one when a file of the
    latest is damaged (with a warning). Every rank reads the same files and makes the same choice.
    defaults: what a key the checkpoint predates meant (train.py's DEFAULTS)."""
    defaults = defaults or {}
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
            meta = check(os.path.join(ckpt, d))
        except ValueError as e:
            problems.append(str(e))
            continue
        if problems and int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: --resume: {problems[0]}; falling back to {os.path.join(ckpt, d)}", file=sys.stderr)
        saved = {k: meta["config"].get(k, defaults.get(k)) for k in config}
        diff = {k: (saved[k], v) for k, v in config.items() if saved[k] != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--resume: the checkpoint in {os.path.join(ckpt, d)} is from another "
                             f"configuration ({lines})")
        return os.path.join(ckpt, d), meta
    raise ValueError(f"--resume: {problems[0]}; no older complete checkpoint to fall back to "
                     f"(--keep-last 2 or more keeps one)")


def save(out, step, pieces, weights, optimizer, scheduler, data_state, config, keep_last):
    """Every rank writes ckpt/step_N.partial/rank{r}.safetensors (tmp, fsync, rename); rank 0 then
    adds meta.json, renames the directory to step_N and switches ckpt/latest to it (the commit
    point). Only then are checkpoints beyond the newest keep_last deleted, so a crash at any moment
    leaves the previous checkpoint complete and current. weights: {name: shape} of every
    trainable weight (the layout a resume checks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = os.path.join(out, "ckpt")
    name = f"step_{step:07d}"
    partial_dir = os.path.join(ckpt, name + ".partial")
    os.makedirs(partial_dir, exist_ok=True)
    tensors, state = rank_state(pieces, optimizer, scheduler)
    path = os.path.join(partial_dir, f"rank{rank}.safetensors")
    with files.replacing(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={"nanollava": json.dumps(state)})
            read_rank_file(tmp)                           # a short write must not pass for a checkpoint
        except Exception as e:  # SafetensorError carries the I/O error (a full disk) as text
            raise OSError(str(e)) from None
    dist.barrier()
    if rank == 0:
        layout = {"world": world, "weights": {n: list(s) for n, s in weights.items()}}
        with files.atomic_write(os.path.join(partial_dir, "meta.json")) as f:
            json.dump({"step": step, "data": data_state, "config": config, "layout": layout}, f)
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
    dist.barrier()
    return os.path.join(ckpt, name)


@torch.no_grad()
def load(ckpt_dir, meta, pieces, weights, optimizer, scheduler):
    """Fill this rank's pieces (weights and AdamW state), the lrs, the scheduler and the RNG from
    a checkpoint written by either engine at any world size."""
    if meta["layout"]["weights"] != {n: list(s) for n, s in weights.items()}:
        raise ValueError(f"--resume: {ckpt_dir} was written for another model or other trainable weights")
    rank, saved_world = dist.get_rank(), meta["layout"]["world"]
    with ExitStack() as stack:
        paths = [os.path.join(ckpt_dir, f"rank{r}.safetensors") for r in range(saved_world)]
        handles = [stack.enter_context(safe_open(p, "pt")) for p in paths]
        states = [read_rank_file(p, f) for p, f in zip(paths, handles)]
        mine = min(rank, saved_world - 1)                  # whose RNG and scalars to take
        try:
            held = {}                                      # name -> [(file, start, numel)]
            for f, state in zip(handles, states):
                for name, start in state["starts"].items():
                    held.setdefault(name, []).append((f, start, f.get_slice(f"model.{name}").get_shape()[0]))

            def read(key, name, start, stop):
                out, covered = torch.empty(stop - start), 0
                for f, s0, n in held.get(name, []):
                    lo, hi = max(start, s0), min(stop, s0 + n)
                    if lo < hi:
                        out[lo - start:hi - start] = f.get_slice(key)[lo - s0:hi - s0]
                        covered += hi - lo
                if covered != stop - start:
                    raise ValueError(f"{key}[{start}:{stop}] is not in the checkpoint")
                return out

            steps = {n: s for state in states for n, s in state["steps"].items()}
            by_param = {}
            for piece in pieces:
                by_param.setdefault(id(piece[3]), []).append(piece)
            for ps in by_param.values():
                p = ps[0][3]
                for name, _, start, _, lo, hi in ps:
                    local(p).view(-1)[lo:hi].copy_(read(f"model.{name}", name, start, start + hi - lo))
                stepped = [name for name, *_ in ps if name in steps]
                if stepped:                                # AdamW state: zeros where a weight had none
                    state = {"step": torch.tensor(steps[stepped[0]], dtype=torch.float32)}
                    for k in ADAM_STATE:
                        state[k] = torch.zeros_like(p)
                        for name, _, start, _, lo, hi in ps:
                            if name in steps:
                                local(state[k]).view(-1)[lo:hi].copy_(
                                    read(f"optimizer.{name}.{k}", name, start, start + hi - lo))
                    optimizer.state[p] = state
            for group in optimizer.param_groups:
                group["lr"] = states[mine]["lrs"][group["name"]]
            scheduler.load_state_dict(states[mine]["scheduler"])
            version, py_state, py_gauss = states[mine]["rng"]["python"]
            random.setstate((version, tuple(py_state), py_gauss))
            mt, pos, has_gauss, gauss = states[mine]["rng"]["numpy"]
            np.random.set_state(("MT19937", np.array(mt, dtype=np.uint32), pos, has_gauss, gauss))
            torch.set_rng_state(handles[mine].get_tensor("rng.torch"))
            if "rng.cuda" in handles[mine].keys() and torch.cuda.is_available():
                torch.cuda.set_rng_state(handles[mine].get_tensor("rng.cuda"))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"--resume: {paths[mine]} does not fit this run ({type(e).__name__}: {e})") from None
