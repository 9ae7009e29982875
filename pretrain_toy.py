"""
Toy-only pretraining: the tiny CLIP-style ViT and the tiny LLaMA that the toy LLaVA starts from.

NOT part of LLaVA. LLaVA-1.5 starts from a pretrained CLIP ViT-L/14-336 and a pretrained
Vicuna; the toy has neither, so this script makes tiny stand-ins from the easy-vqa TRAIN split
only (the test split is never read):

  (a) vision  nanollava.clip.CLIPVisionTower, supervised: two linear heads name the shape and
              the colour of each training image (parsed from its stage-1 caption) from EVERY
              PATCH TOKEN OF LAYER -2, the very features LLaVA's projector reads, so each patch
              token carries the image's shape and colour (the printed accuracy is that of the
              mean-pooled prediction). Blocks after layer -2 and post_layernorm stay at
              initialisation (LLaVA never runs them).
  (b) text    nanollava.llama.LlamaForCausalLM, next-token prediction on the data's text:
              the stage-1 captions and the stage-2 conversations in the vicuna_v1 format with
              the images left out (a tiny "Vicuna": it knows the chat format and the words,
              not the pictures), packed into fixed-length blocks.

On the shapes benchmark (`--data data/shapes`, which holds scenes_train.jsonl; several objects per
image), (a) instead labels each layer -2 patch token with what the drawing puts under it
(nanollava/shapes.py label_maps): the shape, colour and size of the object covering the patch (or
background) and, on tiles only, the digit whose glyph it holds; on 48 px views, each image seen whole (squashed, the
base view) and as one of its four 48 px tiles (full resolution), the views LLaVA-NeXT's AnyRes makes.

`--size large` makes the second size of both (nanollava/toy.py; the scaling ablation).

Both are saved as HuggingFace-format directories: config.json + model.safetensors with the
CLIPVisionModel (`vision_model.*`) and LlamaForCausalLM (`model.*`, `lm_head.*`) keys, plus
the tokenizer next to the LLaMA (as Vicuna ships one). transformers loads them, and
train.py reads them through nanollava.checkpoint.load_from_parts, the same code path as
real CLIP and Vicuna weights. Sizes and step counts: nanollava/toy.py.

    python pretrain_toy.py                         # data/toy -> out/toy/clip, out/toy/llama
    python pretrain_toy.py --vision-steps 20 --text-steps 20 --out /tmp/toy   # quick check
    python pretrain_toy.py --data data/shapes --out out/shapes/large --size large
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from nanollava import checkpoint, conversation, toy
from nanollava import image as image_lib
from nanollava.clip import CLIPVisionTower
from nanollava.llama import LlamaForCausalLM
from nanollava.tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# shared bits

def lr_at(step, total, peak, warmup_frac=0.05):
    """Linear warmup then cosine decay to 10% of peak (the LLaVA schedule shape)."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def adamw(model, lr, weight_decay):
    """AdamW with weight decay on matrices only (not on norms, biases, embeddings of size 1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def save_hf(state, config, out_dir):
    """config.json + model.safetensors, the layout transformers' from_pretrained reads."""
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def read_records(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `python data_prep.py` first")
    with open(path) as f:
        return json.load(f)


class Log:
    """One JSON line per step (train.py metrics.jsonl style)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.f = open(path, "w")

    def __call__(self, **row):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()


# -----------------------------------------------------------------------------
# (a) the vision tower

def caption_labels(caption):
    """(shape index, colour index) named by a caption, -100 (ignored) for what it does not name."""
    words = caption.lower().rstrip(".").split()
    shape = next((toy.SHAPES.index(w) for w in words if w in toy.SHAPES), -100)
    color = next((toy.COLORS.index(w) for w in words if w in toy.COLORS), -100)
    return shape, color


def load_labelled_images(records, image_folder, config):
    """Stage-1 records -> pixels (N, 3, S, S) via nanollava.image (pad, as train/eval), labels (N, 2)."""
    pixels, labels = [], []
    for r in records:
        caption = r["conversations"][1]["value"]
        shape, color = caption_labels(caption)
        if shape == color == -100:
            continue
        path = os.path.join(image_folder, r["image"])
        with Image.open(path) as im:
            x, _ = image_lib.process(im.convert("RGB"), mode="pad", image_size=config.image_size)
        pixels.append(x)
        labels.append((shape, color))
    if not pixels:
        raise ValueError("no stage-1 caption names a shape or a colour: is this the toy stage1.json?")
    return torch.stack(pixels), torch.tensor(labels)


class ShapeColorProbe(nn.Module):
    """CLIPVisionTower + linear shape / colour heads on mean-pooled layer -2 patch tokens."""

    def __init__(self, config):
        super().__init__()
        self.tower = CLIPVisionTower(config)
        emb = self.tower.vision_model.embeddings          # HF CLIP's init (nn.Embedding's N(0, 1) would
        nn.init.normal_(emb.position_embedding.weight, std=0.02)     # drown the patch content)
        nn.init.normal_(emb.class_embedding, std=config.hidden_size ** -0.5)
        self.shape_head = nn.Linear(config.hidden_size, len(toy.SHAPES))
        self.color_head = nn.Linear(config.hidden_size, len(toy.COLORS))

    def forward(self, pixel_values):
        """Shape and colour logits of every patch token at layer -2: (N, P, 3), (N, P, 8)."""
        feats = self.tower(pixel_values, feature_layer=-2, select_strategy="default")   # (N, P, C)
        return self.shape_head(feats), self.color_head(feats)


class PatchProbe(nn.Module):
    """CLIPVisionTower + linear heads on every layer -2 patch token; heads: (labels, classes) per group."""

    def __init__(self, config, heads):
        super().__init__()
        self.tower = CLIPVisionTower(config)
        emb = self.tower.vision_model.embeddings          # HF CLIP's init, as ShapeColorProbe
        nn.init.normal_(emb.position_embedding.weight, std=0.02)
        nn.init.normal_(emb.class_embedding, std=config.hidden_size ** -0.5)
        self.shapes = heads
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, n * k) for n, k in heads)

    def forward(self, pixel_values):
        """Per group, the logits of every patch token at layer -2: [(N, P, labels, classes), ...]."""
        feats = self.tower(pixel_values, feature_layer=-2, select_strategy="default")   # (N, P, C)
        return [head(feats).unflatten(-1, (n, k)) for head, (n, k) in zip(self.heads, self.shapes)]


# what each patch token learns on the shapes benchmark: the object under it, and the view's gist
SHAPES_HEADS = ("shape", "color", "size", "digit", "pair size", "pair column", "pair row", "pair digit")


def patch_labels(scene, maps, cell):
    """(grid^2, 4) local labels of a view's patches, row-major; maps: the view's label maps (canvas pixels,
    not resampled), a patch being cell x cell of them: shape, colour (0 = background) and size of the object
    covering most of the patch (at least 1/16 of it), and the digit whose glyph box it touches; -100 where
    a label does not apply."""
    from nanollava import shapes
    objs = scene["objects"]
    table = torch.tensor([[0, 0, -100, -100]] + [[shapes.SHAPES.index(o["shape"]) + 1, list(shapes.COLORS).index(o["color"]) + 1,
                                                  tuple(shapes.SIZES).index(o["size"]), o["digit"]] for o in objs])
    counts = []
    for m in maps:                                                # (H, W) object ids -> (grid^2, 1 + objects)
        g = m.shape[0] // cell
        counts.append(F.one_hot(m, len(objs) + 1).view(g, cell, g, cell, -1).sum((1, 3)).flatten(0, 1))
    (covered, cover), (touched, touch) = (c[:, 1:].max(-1) for c in counts)
    owner = torch.where(covered * 16 >= cell * cell, cover + 1, 0)          # (P,) 0 = background
    labels = table[owner]
    labels[:, 3] = torch.where(touched > 0, table[touch + 1, 3], -100)
    return labels


def gist_labels(scene, x0, y0, side):
    """(60,) the view's gist, the same for every patch (what a caption-trained CLIP's tokens carry): for
    each of the 15 (colour, shape) pairs, absent / small / big, the canvas cell (of 12 x 12; whole views
    only) of its digit, and the digit; an object is in the view when its digit is."""
    from nanollava import shapes
    pairs = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    out = torch.full((4, len(pairs)), -100, dtype=torch.long)
    out[0] = 0
    for o in scene["objects"]:
        gx, gy = shapes.glyph_origin(o)
        if x0 <= gx and gx + 6 <= x0 + side and y0 <= gy and gy + 10 <= y0 + side:
            k = pairs.index((o["color"], o["shape"]))
            out[:, k] = torch.tensor([1 + tuple(shapes.SIZES).index(o["size"]), gx // 8, gy // 8, o["digit"]])
            if side < shapes.CANVAS:                              # a tile does not know where it lies
                out[1:3, k] = -100
    return out.flatten()


def shapes_views(scene, path, config, tile_index):
    """The base view and tile `tile_index` of one shapes image as the model sees them (AnyRes at 2x2 tiles),
    with their labels: pixels (2, 3, S, S), labels (2, P, 4 + 60)."""
    from nanollava import shapes
    S = config.image_size
    with Image.open(path) as im:
        views, _ = image_lib.process(im.convert("RGB"), mode="anyres", image_size=S, pinpoints=[[2 * S, 2 * S]])
    maps = [torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(shapes.CANVAS, shapes.CANVAS).long()
            for m in shapes.label_maps(scene)]
    ty, tx = divmod(tile_index, 2)
    tile = [m[ty * S:(ty + 1) * S, tx * S:(tx + 1) * S] for m in maps]
    local = [patch_labels(scene, maps, config.patch_size * shapes.CANVAS // S),    # base: 2x2 canvas px a pixel
             patch_labels(scene, tile, config.patch_size)]
    gist = [gist_labels(scene, 0, 0, shapes.CANVAS), gist_labels(scene, tx * S, ty * S, S)]
    local[0][:, 3] = -100               # the base view is never taught digits: they are the tiles' detail
    gist[0].view(4, -1)[3] = -100
    return views[[0, 1 + tile_index]], torch.stack([torch.cat([l, g.expand(len(l), -1)], 1)
                                                    for l, g in zip(local, gist)])


def pretrain_vision_shapes(args, scenes):
    """(a) on the shapes benchmark: per-patch labels on base views and full-resolution tiles, half each."""
    from nanollava import shapes
    config = toy.vision_config(args.size, image_size=toy.SHAPES_IMAGE_SIZE)
    if shapes.CANVAS != 2 * config.image_size:
        raise ValueError(f"shapes scenes are {shapes.CANVAS}px, two tiles of {config.image_size}px expected")
    hp = dict(toy.SHAPES_VISION_PRETRAIN, steps=args.vision_steps or toy.SHAPES_VISION_PRETRAIN["steps"])
    n_images = hp["batch_size"] // 2
    print(f"vision: {len(scenes)} shapes scenes, {config.image_size}px views (base + one tile each), patch "
          f"{config.patch_size} -> {(config.image_size // config.patch_size) ** 2} patch tokens; heads "
          f"{', '.join(SHAPES_HEADS)}")
    torch.manual_seed(args.seed)
    n_pairs, cells = len(shapes.COLORS) * len(shapes.SHAPES), shapes.CANVAS // 8
    heads = [(1, len(shapes.SHAPES) + 1), (1, len(shapes.COLORS) + 1), (1, len(shapes.SIZES)), (1, 10),
             (n_pairs, 1 + len(shapes.SIZES)), (n_pairs, cells), (n_pairs, cells), (n_pairs, 10)]
    model = PatchProbe(config, heads)
    opt = adamw(model, hp["lr"], hp["weight_decay"])
    gen = torch.Generator().manual_seed(args.seed)
    log = Log(os.path.join(args.out, "pretrain_vision.jsonl"))
    right, seen = torch.zeros(2, len(heads)), torch.zeros(2, len(heads))   # (base, tile) x group, since the last print
    t0 = time.time()
    for step in range(hp["steps"]):
        idx = torch.randint(len(scenes), (n_images,), generator=gen).tolist()
        tiles = torch.randint(4, (n_images,), generator=gen).tolist()
        pairs = [shapes_views(scenes[i], os.path.join(args.data, "images", scenes[i]["image"]), config, t)
                 for i, t in zip(idx, tiles)]
        x = torch.cat([v for v, _ in pairs])                      # (B, 3, S, S): base, tile, base, tile, ...
        y = torch.cat([l for _, l in pairs]).split([n for n, _ in heads], dim=-1)   # per group (B, P, labels)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, hp["steps"], hp["lr"])
        logits = model(x)                                         # per group (B, P, labels, classes)
        loss = sum(F.cross_entropy(lg.flatten(0, 2), t.flatten(), ignore_index=-100) for lg, t in zip(logits, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for h, (lg, t) in enumerate(zip(logits, y)):
                ok, labelled = lg.argmax(-1) == t, t >= 0             # (B, P, labels)
                for v in (0, 1):                                  # even rows base views, odd rows tiles
                    right[v, h] += (ok & labelled)[v::2].sum()
                    seen[v, h] += labelled[v::2].sum()
        log(step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
        if step % 50 == 0 or step == hp["steps"] - 1:
            acc = right / seen.clamp(min=1)
            print(f"vision step {step:4d}/{hp['steps']} | loss {loss.item():.4f} | acc base/tile: " +
                  ", ".join(f"{n} {acc[0, h]:.2f}/{acc[1, h]:.2f}" for h, n in enumerate(SHAPES_HEADS)) +
                  f" | {time.time() - t0:.1f}s")
            right.zero_()
            seen.zero_()
    return save_tower(model.tower, config, args, t0)


def save_tower(tower, config, args, t0):
    out = os.path.join(args.out, "clip")
    config_json = dict(checkpoint.vision_config_to_hf(config), architectures=["CLIPVisionModel"], torch_dtype="float32")
    save_hf(tower.state_dict(), config_json, out)          # keys vision_model.* (HF CLIPVisionModel)
    print(f"vision: saved {out} ({sum(p.numel() for p in tower.parameters()) / 1e6:.2f}M params, "
          f"{time.time() - t0:.1f}s)")
    return out


def pretrain_vision(args, records):
    config = toy.vision_config(args.size)
    hp = dict(toy.VISION_PRETRAIN, steps=args.vision_steps or toy.VISION_PRETRAIN["steps"])
    t0 = time.time()
    pixels, labels = load_labelled_images(records, os.path.join(args.data, "images"), config)
    print(f"vision: {len(pixels)} train images, {config.image_size}px, patch {config.patch_size} -> "
          f"{(config.image_size // config.patch_size) ** 2} patch tokens ({time.time() - t0:.1f}s to load)")
    torch.manual_seed(args.seed)
    model = ShapeColorProbe(config)
    opt = adamw(model, hp["lr"], hp["weight_decay"])
    gen = torch.Generator().manual_seed(args.seed)
    log = Log(os.path.join(args.out, "pretrain_vision.jsonl"))
    order, pos = torch.randperm(len(pixels), generator=gen), 0
    stats, seen = torch.zeros(2), 0
    t0 = time.time()
    for step in range(hp["steps"]):
        if pos + hp["batch_size"] > len(order):                 # next epoch
            order, pos = torch.randperm(len(pixels), generator=gen), 0
        idx = order[pos:pos + hp["batch_size"]]
        pos += hp["batch_size"]
        x, y = pixels[idx], labels[idx]
        # augmentation: horizontal flips keep shape and colour
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, hp["steps"], hp["lr"])
        shape_logits, color_logits = model(x)                   # (N, P, 3), (N, P, 8)
        # every patch token must name the image's shape and colour (not just the ones it covers)
        P = shape_logits.shape[1]
        loss = (F.cross_entropy(shape_logits.flatten(0, 1), y[:, 0].repeat_interleave(P), ignore_index=-100)
                + F.cross_entropy(color_logits.flatten(0, 1), y[:, 1].repeat_interleave(P), ignore_index=-100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # accuracy of the mean-pooled prediction (what a linear probe on the averaged tokens says)
        shape_ok = (shape_logits.mean(1).argmax(-1) == y[:, 0]) | (y[:, 0] < 0)
        color_ok = (color_logits.mean(1).argmax(-1) == y[:, 1]) | (y[:, 1] < 0)
        stats += torch.stack([shape_ok, color_ok]).float().sum(1)
        seen += len(y)
        log(step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"], shape_acc=float(shape_ok.float().mean()),
            color_acc=float(color_ok.float().mean()))
        if step % 25 == 0 or step == hp["steps"] - 1:
            print(f"vision step {step:4d}/{hp['steps']} | loss {loss.item():.4f} | train acc shape "
                  f"{stats[0] / seen:.3f} colour {stats[1] / seen:.3f} | {time.time() - t0:.1f}s")
            stats, seen = torch.zeros(2), 0
    return save_tower(model.tower, config, args, t0)


# -----------------------------------------------------------------------------
# (b) the language model

def text_corpus(stage1, stage2, tok):
    """One long token stream: each caption and each conversation (images left out) as a document."""
    stream = []
    for r in stage1:
        stream += [tok.bos_id] + tok.encode(r["conversations"][1]["value"]) + [tok.eos_id]
    for r in stage2:
        turns = [dict(t, value=t["value"].replace(conversation.IMAGE_TAG, "").strip()) for t in r["conversations"]]
        ids, _ = conversation.tokenize(turns, tok, template="vicuna_v1", num_image_tokens=0)
        stream += ids
    return torch.tensor(stream, dtype=torch.long)


def pretrain_text(args, stage1, stage2):
    tok = Tokenizer.from_file(os.path.join(args.data, "tokenizer.json"))
    config = toy.text_config(tok, args.size)
    hp = dict(toy.TEXT_PRETRAIN, steps=args.text_steps or toy.TEXT_PRETRAIN["steps"])
    data = text_corpus(stage1, stage2, tok)
    B, T = hp["batch_size"], hp["block_size"]
    print(f"text: {len(data) / 1e3:.0f}K train tokens, vocab {len(tok)}; {hp['steps']} steps x {B}x{T} tokens "
          f"= {hp['steps'] * B * T / len(data):.2f} epochs")
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    opt = adamw(model, hp["lr"], hp["weight_decay"])
    gen = torch.Generator().manual_seed(args.seed + 1)
    log = Log(os.path.join(args.out, "pretrain_text.jsonl"))
    t0 = time.time()
    for step in range(hp["steps"]):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        chunk = torch.stack([data[s:s + T + 1] for s in starts])     # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, hp["steps"], hp["lr"])
        logits = model(x)                                              # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.time() - t0
        log(step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"], tokens_per_s=(step + 1) * B * T / dt)
        if step % 25 == 0 or step == hp["steps"] - 1:
            print(f"text step {step:4d}/{hp['steps']} | loss {loss.item():.4f} | {(step + 1) * B * T / dt:.0f} tok/s"
                  f" | {dt:.1f}s")
    out = os.path.join(args.out, "llama")
    config_json = dict(checkpoint.text_config_to_hf(config), architectures=["LlamaForCausalLM"], torch_dtype="float32")
    save_hf(model.state_dict(), config_json, out)                      # keys model.*, lm_head.weight
    shutil.copyfile(os.path.join(args.data, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    print(f"text: saved {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{time.time() - t0:.1f}s)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=toy.DATA_DIR, help="toy data folder written by data_prep.py")
    p.add_argument("--out", default=toy.OUT_DIR, help="writes OUT/clip and OUT/llama (+ loss logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-steps", type=int, default=None, help=f"default {toy.VISION_PRETRAIN['steps']}")
    p.add_argument("--text-steps", type=int, default=None, help=f"default {toy.TEXT_PRETRAIN['steps']}")
    p.add_argument("--only", choices=["vision", "text"], help="pretrain one of the two")
    p.add_argument("--size", choices=["small", "large"], default="small",
                   help="large: the scaling ablation's second size of both (nanollava/toy.py)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage1 = read_records(os.path.join(args.data, "stage1.json"))
    scenes = os.path.join(args.data, "scenes_train.jsonl")      # the shapes benchmark: dense labels
    if args.only != "text" and os.path.isfile(scenes):
        with open(scenes) as f:
            pretrain_vision_shapes(args, [json.loads(line) for line in f])
    elif args.only != "text":
        pretrain_vision(args, stage1)
    if args.only != "vision":
        stage2 = read_records(os.path.join(args.data, "stage2.json"))
        pretrain_text(args, stage1, stage2)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pretrain_toy.py: error: {e}")
