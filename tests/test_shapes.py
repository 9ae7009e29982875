"""The shapes benchmark (nanollava/shapes.py, data_prep.py --benchmark shapes): every answer follows
from the drawn scene, the drawing is the scene, the digits need the full resolution, and the same
seed gives the same files."""
import filecmp
import json
import os
import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import data_prep
from nanollava import metrics, shapes

scenes = st.builds(lambda seed, split, i: shapes.make_scene(shapes.scene_rng(seed, split, i)),
                   st.integers(0, 10**6), st.sampled_from(["train", "val", "test"]), st.integers(0, 10**6))


def resolve(name, scene):
    """The one object a question's name ("the circle", "the red circle") picks out."""
    words = name.split()[1:]
    found = [o for o in scene["objects"] if words[-1] == o["shape"] and (len(words) == 1 or words[0] == o["color"])]
    assert len(found) == 1, f"{name!r} names {len(found)} objects of {scene}"
    return found[0]


def oracle(question, scene):
    """The answer to a question read from the scene alone, by its wording (independent of shapes.py)."""
    objs, q = scene["objects"], question
    if m := re.fullmatch(r"What color is (the \w+)\?", q):
        return resolve(m[1], scene)["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        found = [o for o in objs if o["color"] == m[1]]
        assert len(found) == 1, q
        return found[0]["shape"]
    if m := re.fullmatch(r"Is (the [\w ]+) big or small\?", q):
        return resolve(m[1], scene)["size"]
    if m := re.fullmatch(r"What number is on (the [\w ]+)\?", q):
        return str(resolve(m[1], scene)["digit"])
    if m := re.fullmatch(r"Is (the [\w ]+) to the left or to the right of (the [\w ]+)\?", q):
        a, b = resolve(m[1], scene), resolve(m[2], scene)
        assert abs(a["x"] - b["x"]) > a["r"] + b["r"], f"{q}: the two overlap left to right"
        return "left" if a["x"] < b["x"] else "right"
    if m := re.fullmatch(r"Is (the [\w ]+) above or below (the [\w ]+)\?", q):
        a, b = resolve(m[1], scene), resolve(m[2], scene)
        assert abs(a["y"] - b["y"]) > a["r"] + b["r"], f"{q}: the two overlap top to bottom"
        return "above" if a["y"] < b["y"] else "below"
    if q == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(sum(o["shape"] == m[1] for o in objs))
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    raise AssertionError(f"no oracle for the question {q!r}")


@settings(max_examples=300, deadline=None)
@given(scenes)
def test_every_answer_follows_from_the_scene(scene):
    qs = shapes.questions(scene)
    assert {q["kind"] for q in qs} >= {"size", "digit", "count", "exist"}, "every scene asks these kinds"
    for q in qs:
        assert q["kind"] in shapes.KINDS
        assert q["answer"] == oracle(q["question"], scene), f"{q} contradicts {scene}"
        first = metrics.normalize_vqa_answer(q["long"].split(".")[0]).split()
        assert q["answer"] in first, f"the long answer {q['long']!r} does not open with {q['answer']!r}"
    text = shapes.describe(scene)
    assert text.count(" with the number ") == len(scene["objects"])
    for o in scene["objects"]:
        assert shapes.details(o)[1:] in text


@settings(max_examples=100, deadline=None)
@given(scenes)
def test_the_drawing_is_the_scene(scene):
    """Background outside the objects, each object's colour beside its digit, the digit in a checker of
    two inks on the 2x2 cells of the font, inside its object; no two objects touch."""
    img = shapes.render(scene)
    objects, digits = (m.load() for m in shapes.label_maps(scene))
    px = img.load()
    for i, o in enumerate(scene["objects"], 1):
        color = shapes.COLORS[o["color"]]
        gx, gy = shapes.glyph_origin(o)
        assert (gx % 8, gy % 8) == (2, 0), "the digit fills one 8x8 cell (its top 8 rows)"
        assert px[gx - 1, gy + 5] == color, f"{o}: not its colour beside the digit"
        for row, line in enumerate(shapes.GLYPHS[o["digit"]]):
            for col, c in enumerate(line):
                for dx in (0, 1):
                    for dy in (0, 1):
                        x, y = gx + 2 * col + dx, gy + 2 * row + dy
                        assert objects[x, y] == i, f"{o}: its digit leaves the shape at {(x, y)}"
                        ink = 0 if c == "." else shapes.INK if (x + y) % 2 == 0 else -shapes.INK
                        assert px[x, y] == tuple(v + ink for v in color), f"{o}: digit pixel {(x, y)}"
        for p in scene["objects"][i:]:
            assert abs(o["x"] - p["x"]) > o["r"] + p["r"] or abs(o["y"] - p["y"]) > o["r"] + p["r"]
    for x in range(shapes.CANVAS):
        for y in range(shapes.CANVAS):
            assert (objects[x, y] == 0) == (px[x, y] == shapes.BACKGROUND), f"pixel {(x, y)} of {scene}"
            assert digits[x, y] == 0 or objects[x, y] == digits[x, y]


@settings(max_examples=30, deadline=None)
@given(scenes, st.integers(0, 8))          # every digit moved by 1-9: a different one
def test_digits_vanish_in_the_base_view_and_read_at_full_resolution(scene, other):
    """Squashed 2x (the base view, CLIP's bicubic resize) a scene and the same scene with every digit
    replaced look the same to within 6 of 255 levels; the full-resolution canvas (AnyRes tiles) differs."""
    changed = {"objects": [dict(o, digit=(o["digit"] + 1 + other) % 10) for o in scene["objects"]]}
    a, b = shapes.render(scene), shapes.render(changed)
    assert a.tobytes() != b.tobytes()
    half = (shapes.CANVAS // 2,) * 2
    small_a, small_b = (im.resize(half, Image.Resampling.BICUBIC).tobytes() for im in (a, b))
    assert max(abs(p - q) for p, q in zip(small_a, small_b)) <= 6


def test_pope_negatives_are_adversarial_when_the_scene_allows():
    rng = random.Random(0)
    for i in range(300):
        scene = shapes.make_scene(shapes.scene_rng(0, "test", i))
        colors, kinds = {o["color"] for o in scene["objects"]}, {o["shape"] for o in scene["objects"]}
        can = any((c, s) not in {(o["color"], o["shape"]) for o in scene["objects"]} for c in colors for s in kinds)
        for q in shapes.sample_questions(scene, rng, kinds=("exist",)):
            if q["answer"] == "no" and can:
                assert shapes.adversarial(q, scene), f"{q['question']} is not adversarial for {scene}"


def test_same_seed_same_files_and_splits_are_separate(tmp_path):
    for name in ("a", "b"):
        data_prep.main(["--benchmark", "shapes", "--out", str(tmp_path / name), "--limit", "24"])
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    files = []

    def walk(c, prefix=""):
        assert not c.left_only and not c.right_only and not c.funny_files, c.report()
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, f"{prefix}: differ: {mismatch + errors}"
        files.extend(prefix + f for f in c.common_files)
        for sub, d in c.subdirs.items():
            walk(d, prefix + sub + "/")
    walk(cmp)
    assert {"stage1.json", "stage2.json", "tokenizer.json", "eval_questions.jsonl", "eval_answers.jsonl",
            "images/test/0.png"} <= set(files)
    layouts = {split: [shapes.layout(json.loads(line)) for line in
                       (tmp_path / "a" / f"scenes_{split}.jsonl").read_text().splitlines()]
               for split in ("train", "val", "test")}
    assert not set(layouts["train"]) & (set(layouts["val"]) | set(layouts["test"])), "a test layout was trained on"
    assert len(set(layouts["val"] + layouts["test"])) > 0.9 * 48, "val and test are drawn from their own seeds"
    data_prep.main(["--benchmark", "shapes", "--out", str(tmp_path / "c"), "--limit", "24", "--seed", "1"])
    assert (tmp_path / "c" / "stage2.json").read_text() != (tmp_path / "a" / "stage2.json").read_text()
    assert os.path.getsize(tmp_path / "a" / "images" / "train" / "0.png") > 0


def test_val_and_test_skip_the_layouts_train_has():
    """At full size, seed 0's first 600 test seeds repeat 21 train layouts (differing in digits at most)."""
    train = {shapes.layout(scene) for _, scene in data_prep.shapes_split(0, "train", 3200)}
    test = data_prep.shapes_split(0, "test", 600, train)
    assert len(test) == 600 and not {shapes.layout(scene) for _, scene in test} & train
    assert sum(i < 600 for i, _ in test) == 579, "the 21 repeats were skipped, and nothing else"
