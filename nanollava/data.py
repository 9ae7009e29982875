"""LLaVA instruction data: JSON records -> (input_ids, labels, pixels), batching, and the
modality- and length-grouped global batches (LLaVA-1.5 `group_by_modality_length`).

A record is `{"id", "image"?: str | [str, ...], "conversations": [{"from", "value"}, ...]}`
(LCS-558K, llava_v1_5_mix665k.json). Images are decoded in `__getitem__`, i.e. in DataLoader
workers. Each `<image>` expands to its visual tokens (HF convention), so the sequence length is
known before the vision tower runs and truncation can keep images whole: text after the last
whole image is dropped; a sample whose first image does not fit is skipped and counted.

Bad records (missing/corrupt/oversized image, malformed conversation, text that is not valid
Unicode, ...) never crash an epoch: `__getitem__` warns, counts the reason and returns the next
good record. The counts travel with the sample (`sample["skipped"]`, summed by `collate`), so
the training loop sees the skips of every DataLoader worker; `dataset.skipped` is this
process's own tally. Two guards keep "skip" from hiding a broken setup: the dataset refuses an
image folder that holds none of the first images the data names, and `__getitem__` gives up
with a DataError after MAX_SKIPS_IN_A_ROW bad records in a row. data_prep.py finds every bad
record up front in one pass.

Images are checked from their header, before any pixel is decoded: at most MAX_IMAGE_PIXELS
for the square a `pad` image is pasted on (max(w, h)^2, so also w * h) and an aspect ratio of
at most MAX_ASPECT_RATIO (`crop` scales the short side to 336: a 30000x1 strip would become
336 x 10 million pixels). Decoding memory is bounded by the pixel count, not the file size: a
169-byte PNG can claim 30000x30000 pixels.
"""
import io
import json
import os
import warnings
from collections import Counter

import torch
from PIL import Image

from nanollava import conversation, image
from nanollava.conversation import IGNORE_INDEX, IMAGE_TAG
from nanollava.files import read_json

MAX_IMAGE_PIXELS = 8192 * 8192    # 64 M pixels: 192 MiB as RGB
MAX_ASPECT_RATIO = 50             # long side / short side
MAX_SKIPS_IN_A_ROW = 64           # more bad records in a row than this: the setup is wrong, stop
FOLDER_PROBE = 32                 # images looked up to tell a wrong --image-folder from bad records


class DataError(RuntimeError):
    """The data cannot be used at all (not one bad record: those are skipped)."""


class ImageTooLarge(ValueError):
    """An image over MAX_IMAGE_PIXELS (or PIL's own decompression-bomb limit): serve.py answers 413."""


# ---------------------------------------------------------------------------------------------
# records

def load_json(path):
    """A LLaVA JSON file (a list of records); file-level errors name the file, line and column."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to read (LLaVA records are a few "
                             "levels deep)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def load_json_object(path):
    """A small JSON object file (an index, a checkpoint's meta.json); errors name the file."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def record_images(rec):
    """The record's image paths as a list ([] for text-only)."""
    img = rec.get("image")
    if img is None:
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, list) and all(isinstance(p, str) for p in img):
        return list(img)
    raise ValueError(f"'image' must be a path or a list of paths, got {img!r:.80}")


def check_record(rec):
    """Raise ValueError naming the problem if a record is malformed (images are not opened)."""
    if not isinstance(rec, dict):
        raise ValueError(f"record must be a JSON object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("record has no 'conversations' list")
    conversation._check(conv, "vicuna_v1")        # alternating human/gpt, ending with gpt
    for t, turn in enumerate(conv):
        bad = next((i for i, c in enumerate(turn["value"]) if 0xD800 <= ord(c) <= 0xDFFF), None)
        if bad is not None:                       # valid JSON ("\udcff"), but not Unicode text
            raise ValueError(f"turn {t}: text is not valid Unicode (lone surrogate at character {bad})")
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise ValueError(f"turn {t}: empty assistant reply")
        if turn["from"] == "gpt" and IMAGE_TAG in turn["value"]:
            raise ValueError(f"turn {t}: {IMAGE_TAG} in an assistant reply")
    images = record_images(rec)
    n_tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv)
    if n_tags and not images:
        raise ValueError(f"{IMAGE_TAG} in a record without an image")
    if images and not n_tags:
        raise ValueError(f"record has {len(images)} image(s) but no {IMAGE_TAG} tag")
    if n_tags > len(images):
        raise ValueError(f"more {IMAGE_TAG} tags ({n_tags}) than images ({len(images)})")
    if n_tags < len(images):
        raise ValueError(f"fewer {IMAGE_TAG} tags ({n_tags}) than images ({len(images)})")
    return images


def image_path(image_folder, rel):
    """Absolute path of an image; refuses paths that escape `image_folder` (`../`, absolute)."""
    root = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"image path {rel!r} escapes the image folder {image_folder}")
    return path


def check_image_size(width, height, path):
    """Refuse an image whose preprocessing would allocate too much (see the module docstring)."""
    if width == 0 or height == 0:
        raise ValueError(f"image has zero size ({width}x{height}): {path}")
    side = max(width, height)
    if side > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"image too thin: {width}x{height} (aspect ratio {side / min(width, height):.0f}:1, "
                         f"limit {MAX_ASPECT_RATIO}:1): {path}")
    if side * side > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"image too large: {width}x{height} ({side}x{side} = {side * side:,} pixels once "
                         f"padded to a square, limit {MAX_IMAGE_PIXELS:,}): {path}")


def open_image(path, data=None):
    """Open, size-check (header only) and fully decode an image; clear errors for missing, empty,
    corrupt, oversized, too thin or 0-size files. data: the image's bytes (an upload, a base64
    field of a question file); `path` then only names it in errors."""
    if data is None and not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if (len(data) if data is not None else os.path.getsize(path)) == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        img = Image.open(path if data is None else io.BytesIO(data))      # reads the header only
    except Image.DecompressionBombError as e:     # PIL's own limit, > 2 * its MAX_IMAGE_PIXELS
        raise ImageTooLarge(f"image too large: {e}: {path}") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError ...
        raise ValueError(f"unreadable or corrupt image {path}: {e}") from None
    check_image_size(img.width, img.height, path)
    try:
        img.load()
    except Exception as e:
        raise ValueError(f"unreadable or corrupt image {path}: {e}") from None
    return img


def check_image_folder(records, image_folder, json_path, probe=FOLDER_PROBE):
    """Fail fast on a wrong --image-folder: if none of the first `probe` images the records name
    exists under it, that is a setup error (one line), not thousands of skipped records."""
    looked = []
    for rec in records:
        try:
            looked += [image_path(image_folder, p) for p in record_images(rec)] if isinstance(rec, dict) else []
        except ValueError:                        # a bad record: the dataset skips it later
            continue
        if len(looked) >= probe:
            break
    if looked and not any(os.path.isfile(p) for p in looked):
        raise FileNotFoundError(f"none of the first {len(looked)} images {json_path} names is in the image "
                                f"folder {image_folder} (e.g. {looked[0]}); is --image-folder right?")


def image_spans(input_ids, image_token_id, image_counts=None):
    """[(start, end), ...] of each image's run of visual tokens. image_counts (tokens per image)
    separates adjacent images; without it each maximal run of image tokens is one image."""
    spans, j, k = [], 0, 0
    while j < len(input_ids):
        if input_ids[j] != image_token_id:
            j += 1
            continue
        if image_counts is not None:
            end = j + image_counts[k]
        else:
            end = j
            while end < len(input_ids) and input_ids[end] == image_token_id:
                end += 1
        spans.append((j, end))
        j, k = end, k + 1
    return spans


def truncate(input_ids, labels, image_token_id, max_length, image_counts=None):
    """Cut to max_length without splitting an image's run of visual tokens.

    A cut inside an image moves back to that image's start (text after the last whole image is
    dropped). Returns (input_ids, labels, n_images_kept), or None when the first image does not
    fit or nothing supervised is left.
    """
    spans = image_spans(input_ids, image_token_id, image_counts)
    cut = min(len(input_ids), max_length)
    for k, (start, end) in enumerate(spans):
        if start < cut < end:
            if k == 0:
                return None
            cut = start
    input_ids, labels = input_ids[:cut], labels[:cut]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return input_ids, labels, sum(end <= cut for _, end in spans)


# ---------------------------------------------------------------------------------------------
# dataset

class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA-format JSON + image folder -> dict(input_ids, labels, pixel_values, image_sizes).

    template: "plain" (stage 1) or "vicuna_v1" (stage 2); images use config.image_aspect_ratio.
    index: data_prep's X.index.json (exact token lengths for the sampler), found next to X.json
    when not given; without one, lengths are estimated from word counts as LLaVA's
    `modality_lengths` does.
    """

    def __init__(self, json_path, image_folder, tokenizer, config, template=None, max_length=2048,
                 index=None, mode=None):
        self.json_path = json_path
        self.records = load_json(json_path)
        self.image_folder = image_folder
        self.tok = tokenizer
        self.config = config
        self.template = template or config.template
        self.mode = mode or config.image_aspect_ratio
        self.max_length = max_length
        self.skipped = Counter()
        self._index = None
        check_image_folder(self.records, image_folder, json_path)
        if index is None and os.path.isfile(os.path.splitext(json_path)[0] + ".index.json"):
            index = os.path.splitext(json_path)[0] + ".index.json"   # written by data_prep.py
        if index is not None:
            index_json = load_json_object(index)
            self._index = index_json.get("records")
            if not isinstance(self._index, list):
                raise ValueError(f"{index}: no 'records' list; rerun data_prep.py")
            if len(self._index) != len(self.records):
                raise ValueError(f"{index} describes {len(self._index)} records but {json_path} "
                                 f"has {len(self.records)}; rerun data_prep.py")

    def __len__(self):
        return len(self.records)

    @property
    def lengths(self):
        """Signed lengths for global_batches: +tokens for samples with images, -tokens text-only."""
        n_img = (self.config.vision.image_size // self.config.vision.patch_size) ** 2  # an estimate for anyres
        out = []
        for i, rec in enumerate(self.records):
            if self._index is not None:
                n_images, text = self._index[i]["n_images"], self._index[i]["text_tokens"]
            else:
                n_images = len(rec.get("image") or []) if isinstance(rec.get("image"), list) \
                    else int("image" in rec)
                conv = rec.get("conversations") or []
                text = sum(len(str(t.get("value", "")).split()) for t in conv if isinstance(t, dict))
            length = max(1, min(self.max_length, text + n_images * n_img))
            out.append(length if n_images else -length)
        return out

    def load(self, i):
        """Record i -> sample dict; raises ValueError / FileNotFoundError on a bad record."""
        rec = self.records[i]
        paths = [image_path(self.image_folder, p) for p in check_record(rec)]
        imgs = [open_image(p) for p in paths]
        processed = image.process_images(imgs, self.config, self.mode)        # pixels, size, count per image
        counts = [n for _, _, n in processed]
        ids, labels = conversation.tokenize(rec["conversations"], self.tok, self.template, counts)
        kept = truncate(ids, labels, self.tok.image_token_id if imgs else -1, self.max_length, counts)
        if kept is None:
            raise ValueError(f"does not fit in max_length={self.max_length} without splitting "
                             "its first image or losing every supervised token")
        ids, labels, n = kept
        pixels = [p for p, _, _ in processed[:n]]
        return dict(input_ids=torch.tensor(ids, dtype=torch.long),
                    labels=torch.tensor(labels, dtype=torch.long),
                    # (n, 3, H, W); anyres: (n, max views, 3, H, W), zero-padded views
                    pixel_values=(None if not pixels else pad_views(pixels) if self.mode == "anyres"
                                  else torch.stack(pixels)),
                    image_sizes=[s for _, s, _ in processed[:n]])

    def __getitem__(self, i):
        """Record i, or the next good one; sample["skipped"] counts the bad ones passed over."""
        skipped = Counter()
        for k in range(min(len(self.records), MAX_SKIPS_IN_A_ROW)):
            j = (i + k) % len(self.records)
            try:
                sample = self.load(j)
                sample["skipped"] = skipped
                return sample
            except (ValueError, FileNotFoundError, OSError, MemoryError) as e:
                reason = str(e) or type(e).__name__
                skipped[type(e).__name__] += 1
                self.skipped[type(e).__name__] += 1
                rid = self.records[j].get("id", j) if isinstance(self.records[j], dict) else j
                warnings.warn(f"{self.json_path}: skipping record {j} (id {rid}): {reason}", stacklevel=2)
        raise DataError(f"{self.json_path}: no usable record in {sum(skipped.values())} in a row from record "
                        f"{i} (last: {reason}); data_prep.py lists every bad record")


def pad_views(pixels):
    """Stack AnyRes images of different view counts: list of (views_i, 3, H, W) (or already batched
    (n, views, 3, H, W)) -> (N, max views, 3, H, W), zero-padded like HF's processor; the model reads
    each image's real count from its image_sizes row."""
    pixels = [p for x in pixels for p in (x if x.dim() == 5 else [x])]
    views = max(p.shape[0] for p in pixels)
    return torch.stack([torch.cat([p, p.new_zeros(views - p.shape[0], *p.shape[1:])]) for p in pixels])


def collate(batch, pad_id, ignore_index=IGNORE_INDEX):
    """Right-pad a list of samples into a batch (None entries are dropped).

    Returns dict(input_ids (B, T), labels (B, T), attention_mask (B, T), pixel_values (N, 3, H, W)
    or None, image_sizes (N, 2) as (height, width) or None); images in row-major order.
    """
    batch = [b for b in batch if b is not None]
    if not batch:
        raise ValueError("collate got an empty batch")
    T = max(len(b["input_ids"]) for b in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[r, :n] = b["input_ids"]
        labels[r, :n] = b["labels"]
        attention_mask[r, :n] = 1
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    sizes = [s for b in batch for s in b["image_sizes"]]
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=(None if not pixels else pad_views(pixels) if pixels[0].dim() == 5
                              else torch.cat(pixels)),
                image_sizes=torch.tensor(sizes, dtype=torch.long) if sizes else None,
                skipped=dict(sum((Counter(b.get("skipped", {})) for b in batch), Counter())))


# ---------------------------------------------------------------------------------------------
# global batches (LLaVA train/llava_trainer.py: get_modality_length_grouped_indices)

def length_grouped_megabatches(lengths, megabatch, generator):
    """Shuffle, cut into megabatches, sort each by length (longest first)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    return [sorted(perm[i:i + megabatch], key=lambda j: lengths[j], reverse=True)
            for i in range(0, len(perm), megabatch)]


def modality_length_grouped_megabatches(lengths, megabatch, generator):
    """LLaVA `group_by_modality_length`: multimodal (length > 0) and text-only (< 0) samples form
    separate megabatches, which are shuffled together; the two leftovers form a last megabatch.
    With a single modality this is plain length grouping."""
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return length_grouped_megabatches([abs(l) for l in lengths], megabatch, generator)
    groups = []
    for sign in (1, -1):
        idx = [i for i, l in enumerate(lengths) if l * sign > 0]
        mbs = length_grouped_megabatches([abs(lengths[i]) for i in idx], megabatch, generator)
        groups.append([[idx[j] for j in mb] for mb in mbs])
    (mm, lang) = groups
    leftover = sorted(mm[-1] + lang[-1], key=lambda j: abs(lengths[j]), reverse=True)
    megabatches = mm[:-1] + lang[:-1]
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[k] for k in order]
    # the leftover may exceed one megabatch (two partial ones): cut it to size
    return megabatches + [leftover[i:i + megabatch] for i in range(0, len(leftover), megabatch)]


def global_batches(lengths, global_batch, seed=0, epoch=0, group_by_length=True):
    """The optimizer steps of one epoch: lists of `global_batch` sample indices, the same whatever
    the world size and micro-batch (deterministic in seed and epoch; an incomplete last batch is
    dropped).

    group_by_length: LLaVA's modality and length grouping with one megabatch per global batch, so
    each global batch holds one modality (but the leftover) and is sorted by length, longest first.
    The original groups megabatches of world_size x per-device batch, so moving from 1 GPU to 8
    changes which samples train together (docs/fsdp.md). Otherwise a plain seeded shuffle.
    lengths: signed (LLaVADataset.lengths: + with images, - text-only).
    """
    if any(l == 0 for l in lengths):
        raise ValueError("sample lengths must be non-zero (positive: with image, negative: text-only)")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if group_by_length:
        batches = modality_length_grouped_megabatches(lengths, global_batch, g)
    else:
        perm = torch.randperm(len(lengths), generator=g).tolist()
        batches = [perm[i:i + global_batch] for i in range(0, len(perm), global_batch)]
    return [b for b in batches if len(b) == global_batch]


def rank_micro_batches(batch, world_size, rank, micro_batch):
    """Rank `rank`'s micro-batches of one global batch, in order: the batch is cut into
    world_size x accumulation micro-batches of consecutive samples (similar lengths when it is
    sorted: little padding), dealt to the ranks in turn, so that the ranks' k-th micro-batches,
    which wait for each other at every collective, are about as long."""
    micro = [batch[i:i + micro_batch] for i in range(0, len(batch), micro_batch)]
    return micro[rank::world_size]
