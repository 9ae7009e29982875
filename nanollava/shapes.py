"""The shapes benchmark: procedural scenes that can separate LLaVA's ablations on a laptop.

NOT part of LLaVA. easy-vqa (one shape per 64x64 image) saturates at 96-99 % with every variant,
so the toy ablations (ablate.py, docs/ablations.md) need a harder test. Each scene here is drawn
from a seed with PIL, no download:

  scene      1-4 objects on a grey canvas of CANVAS px: a shape (circle, square, triangle), a colour
             (5), a size (small / big) and a position; no two objects share colour and shape, and
             their bounding boxes never touch. Every object carries a digit (a 3x5 font at 2x, 6x10
             px) printed in a fine checker of two inks whose mean is the object's colour, like a
             halftone: legible at the canvas resolution, but squashing the canvas 2x to the tower's
             tile (the base view) averages every 2x2 checker cell to the object's colour, and the
             digit all but vanishes (no value moves more than 6 of 255 levels, tests/test_shapes.py;
             pretrain_toy.py never teaches the tower to read a digit there). LLaVA-NeXT's AnyRes tiles,
             cut from the full-resolution canvas, give it back. The digit's top 8 rows (enough to
             tell the ten apart) fill one 8x8 cell of the canvas: one patch of the toy tower.
  questions  short answers, by kind: color, shape, size, count, position (left/right, above/below),
             digit (the detail question), exist (POPE-style yes/no; the negatives are adversarial
             when the scene allows: both the colour and the shape are present, not together)
  long form  a detailed description, and conversational answers to the same short questions
             (a sentence plus the object's details): LLaVA-1.5's response-format conflict.

A scene is a dict (JSON-safe), so its questions can be checked against it (tests/test_shapes.py)
and the vision tower can be pretrained on per-patch labels (`label_maps`, pretrain_toy.py).
`python data_prep.py --benchmark shapes` writes the splits.
"""
import random

from PIL import Image, ImageDraw

CANVAS = 96                          # px; the toy tower's tile is 48, so AnyRes (2x2) sees it at full resolution
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (195, 60, 60), "green": (60, 165, 75), "blue": (65, 95, 195), "yellow": (195, 180, 60),
          "purple": (150, 70, 190)}     # every channel in [60, 195], so the ink can swing INK either way
INK = 60                             # the digit's checker: the object's colour + INK and - INK
SIZES = {"small": (9, 11), "big": (14, 17)}   # half-width in px, inclusive range
KINDS = ("color", "shape", "size", "count", "position", "digit", "exist")        # short answers
LONG_KINDS = ("conv", "describe")                                                  # long-form answers
GLYPHS = {   # 3x5 digits, one string per row
    0: ("###", "#.#", "#.#", "#.#", "###"), 1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"), 3: ("###", "..#", "###", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"), 5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"), 7: ("###", "..#", "..#", "..#", "..#"),
    8: ("###", "#.#", "###", "#.#", "###"), 9: ("###", "#.#", "###", "..#", "###"),
}
DESCRIBE_PROMPTS = ("Describe the image in detail.", "What is in this image? Describe every object.",
                    "Give a detailed description of the picture.")
CAPTION_PROMPTS = ("Describe the image briefly.", "Write a short caption for the image.",
                   "What is in the picture?")


# ---------------------------------------------------------------------------------------------
# scenes

def make_scene(rng, max_objects=4):
    """A random scene {"objects": [{shape, color, size, r, x, y, digit}, ...]}, objects sorted left
    to right; rng is a random.Random."""
    n = rng.randint(1, max_objects)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)       # no (colour, shape) twice
    objects = []
    for color, shape in kinds:
        size = rng.choice(tuple(SIZES))
        r = rng.randint(*SIZES[size])
        lift = r // 3 if shape == "triangle" else 0                       # the digit sits at (x, y + lift)
        for _ in range(200):                                               # rejection: boxes 2 px apart
            x = 8 * rng.randint((r + 4) // 8, (CANVAS - r - 6) // 8) + 5   # the digit's box: columns 2-7,
            y = 8 * rng.randint((r + lift + 4) // 8, (CANVAS - r + lift - 6) // 8) + 5 - lift   # rows 0-9
            if all(abs(x - o["x"]) > r + o["r"] + 2 or abs(y - o["y"]) > r + o["r"] + 2 for o in objects):
                objects.append(dict(shape=shape, color=color, size=size, r=r, x=x, y=y, digit=rng.randint(0, 9)))
                break
    return {"objects": sorted(objects, key=lambda o: (o["x"], o["y"]))}


def glyph_origin(o):
    """Top-left pixel of an object's 6x10 digit, centred on the object (a triangle's centroid): always
    column 2, row 0 of an 8x8 cell of the canvas (make_scene places the objects so)."""
    cy = o["y"] + o["r"] // 3 if o["shape"] == "triangle" else o["y"]
    return o["x"] - 3, cy - 5


def _draw(draw, o, fill, ink):
    """One object: its shape in `fill`, then its digit, each font pixel a 2x2 cell of ink(x, y)."""
    x, y, r = o["x"], o["y"], o["r"]
    if o["shape"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o["shape"] == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    gx, gy = glyph_origin(o)
    for row, line in enumerate(GLYPHS[o["digit"]]):
        for col, c in enumerate(line):
            for dx in range(2 * (c == "#")):
                for dy in range(2):
                    px, py = gx + 2 * col + dx, gy + 2 * row + dy
                    draw.point((px, py), fill=ink(px, py))


def render(scene):
    """The scene as an RGB PIL image of CANVAS x CANVAS px."""
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        c = COLORS[o["color"]]
        _draw(draw, o, c, lambda x, y: tuple(v + (INK if (x + y) % 2 == 0 else -INK) for v in c))
    return img


def label_maps(scene):
    """Two "L" images of CANVAS px, the drawing's own pixels: which object (1-based, 0 = background)
    covers each pixel, and which object's digit box (6x10) holds it. pretrain_toy.py's patch labels."""
    objects, digits = Image.new("L", (CANVAS, CANVAS), 0), Image.new("L", (CANVAS, CANVAS), 0)
    draw_o, draw_d = ImageDraw.Draw(objects), ImageDraw.Draw(digits)
    for i, o in enumerate(scene["objects"], 1):
        _draw(draw_o, o, i, lambda x, y: i)
        gx, gy = glyph_origin(o)
        draw_d.rectangle([gx, gy, gx + 5, gy + 9], fill=i)
    return objects, digits


# ---------------------------------------------------------------------------------------------
# words

def place(o):
    """Where an object is, in thirds of the canvas: "top left", "center", "bottom", ..."""
    col = ("left", "", "right")[min(2, 3 * o["x"] // CANVAS)]
    row = ("top", "", "bottom")[min(2, 3 * o["y"] // CANVAS)]
    return f"{row} {col}".strip() or "center"


def name(o, scene):
    """The shortest name that picks the object out: "the circle", else "the red circle"."""
    same_shape = sum(p["shape"] == o["shape"] for p in scene["objects"])
    return f"the {o['shape']}" if same_shape == 1 else f"the {o['color']} {o['shape']}"


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def details(o):
    """One object in full: "a big red circle with the number 7 at the top left"."""
    return f"a {o['size']} {o['color']} {o['shape']} with the number {o['digit']} at the {place(o)}"


def caption(scene):
    """Stage 1's short caption: the objects left to right, "a big red circle and a small blue square."."""
    parts = [f"a {o['size']} {o['color']} {o['shape']}" for o in scene["objects"]]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def describe(scene):
    """The long-form target: how many objects, then each one in full, left to right."""
    objs = scene["objects"]
    head = f"There {'is' if len(objs) == 1 else 'are'} {plural(len(objs), 'object')} in the image."
    return " ".join([head] + [details(o)[0].upper() + details(o)[1:] + "." for o in objs])


# ---------------------------------------------------------------------------------------------
# questions: every (kind, question, short answer, long answer) a scene supports

def questions(scene):
    """All the questions a scene can answer unambiguously, as dicts kind, question, answer (short)
    and long (a conversational sentence that contains the answer, then the object's details)."""
    objs, out = scene["objects"], []

    def add(kind, q, a, long):
        out.append(dict(kind=kind, question=q, answer=a, long=long))

    for o in objs:
        n, full = name(o, scene), details(o)
        cap = n[0].upper() + n[1:]
        if sum(p["shape"] == o["shape"] for p in objs) == 1:        # named without its colour
            add("color", f"What color is {n}?", o["color"], f"{cap} is {o['color']}. It is {full}.")
        if sum(p["color"] == o["color"] for p in objs) == 1:        # named without its shape
            add("shape", f"What shape is the {o['color']} object?", o["shape"],
                f"The {o['color']} object is a {o['shape']}. It is {full}.")
        add("size", f"Is {n} big or small?", o["size"], f"{cap} is {o['size']}. It is {full}.")
        add("digit", f"What number is on {n}?", str(o["digit"]),
            f"The number on {n} is {o['digit']}. It is {full}.")
        for p in objs:
            if p is o:
                continue
            m = name(p, scene)
            if abs(o["x"] - p["x"]) > o["r"] + p["r"]:            # apart in x: no overlap to argue about
                side = "left" if o["x"] < p["x"] else "right"
                add("position", f"Is {n} to the left or to the right of {m}?", side,
                    f"{cap} is to the {side} of {m}. It is {full}.")
            if abs(o["y"] - p["y"]) > o["r"] + p["r"]:
                side = "above" if o["y"] < p["y"] else "below"
                add("position", f"Is {n} above or below {m}?", side, f"{cap} is {side} {m}. It is {full}.")
    for shape in SHAPES:
        k = sum(o["shape"] == shape for o in objs)
        add("count", f"How many {shape}s are there?", str(k),
            f"There {'is' if k == 1 else 'are'} {plural(k, shape)} in the image.")
    for color in COLORS:
        k = sum(o["color"] == color for o in objs)
        if k:
            add("count", f"How many {color} objects are there?", str(k),
                f"There {'is' if k == 1 else 'are'} {plural(k, color + ' object')} in the image.")
    add("count", "How many objects are there?", str(len(objs)),
        f"There {'is' if len(objs) == 1 else 'are'} {plural(len(objs), 'object')} in the image.")
    present = {(o["color"], o["shape"]) for o in objs}
    for color in COLORS:
        for shape in SHAPES:
            q = f"Is there a {color} {shape} in the image?"
            if (color, shape) in present:
                o = next(o for o in objs if (o["color"], o["shape"]) == (color, shape))
                add("exist", q, "yes", f"Yes, there is a {color} {shape}. It is {details(o)}.")
            else:
                add("exist", q, "no", f"No, there is no {color} {shape} in the image.")
    return out


def adversarial(q, scene):
    """A POPE "no" whose colour and shape are both in the scene, on other objects (the hardest negative)."""
    words = q["question"].split()
    color, shape = words[3], words[4]
    return (any(o["color"] == color for o in scene["objects"]) and
            any(o["shape"] == shape for o in scene["objects"]))


def sample_questions(scene, rng, kinds=KINDS):
    """One question of each kind the scene supports (exist: "yes" or a "no" at even odds, the "no"
    adversarial when the scene has one)."""
    by_kind = {}
    for q in questions(scene):
        by_kind.setdefault(q["kind"], []).append(q)
    out = []
    for kind in kinds:
        pool = by_kind.get(kind, [])
        if kind == "exist":
            yes = [q for q in pool if q["answer"] == "yes"]
            no = [q for q in pool if q["answer"] == "no"]
            pool = yes if rng.random() < 0.5 else ([q for q in no if adversarial(q, scene)] or no)
        if pool:
            out.append(rng.choice(pool))
    return out


def layout(scene):
    """A scene without its digits: val and test scenes whose layout a train scene has are left out."""
    return tuple(tuple(sorted((k, v) for k, v in o.items() if k != "digit")) for o in scene["objects"])


def scene_rng(seed, split, index):
    """Each scene has its own generator, so any one can be rebuilt (str seeds hash with sha512: stable)."""
    return random.Random(f"shapes/{seed}/{split}/{index}")
