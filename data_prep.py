"""Turn raw LLaVA data into what train.py reads, or build the embedded toy data set.

  python data_prep.py                      # toy: easy-vqa -> data/toy/ (well under a minute)
  python data_prep.py --json X.json --image-folder DIR --out DIR [--tokenizer tokenizer.json]
                      [--max-length N] [--template vicuna_v1] [--num-image-tokens 576]

Validation is ONE pass over the records (images are opened and fully decoded, in --workers
processes). For X.json it writes to --out:
  X.json          the good records (unchanged, same order as in X.json minus the bad ones)
  X.index.json    {"source", "image_folder", "template", "num_image_tokens", "max_length",
                   "tokens_estimated", "records": [{"id", "n_images", "text_tokens"}, ...]}
                  text_tokens counts the conversation's tokens with the images left out; a
                  sample's length is text_tokens + n_images * num_image_tokens. LLaVADataset
                  reads it (next to X.json) for the length-grouped sampler.
  X.report.txt    one line per broken / skipped / truncated record with the reason
and prints counts of good, broken and skipped records by reason. Every output is written
atomically (a temporary file, fsynced, then renamed; all three only once each is complete), so
an earlier good output survives any failure and no `.tmp` is left behind.

The toy (default --out data/toy) is built from the `easy-vqa` package (MIT; 64x64 PNGs of one
coloured shape, 4,000 train / 1,000 test images):
  images/{train,test}/<id>.png   copies of the package's PNGs
  stage1.json                    captions ("plain" template): "<image>\\n<instruction>" -> caption
  stage2.json                    multi-turn VQA ("vicuna_v1"), "<image>" in the first turn, each
                                 question + "\\nAnswer the question using a single word or phrase."
  stage{1,2}.index.json, stage{1,2}.report.txt   as above
  eval_questions.jsonl           {"question_id", "image", "text", "category": "yesno"|"open"}
  eval_answers.jsonl             {"question_id", "answer", "category"}
  tokenizer.json                 BPE (Metaspace, LLaMA-style), <unk>=0 <s>=1 </s>=2 <pad>=3 <image>=4
Image paths in all files are relative to images/.

`--benchmark shapes` (default --out data/shapes) builds the harder procedural benchmark of
nanollava/shapes.py instead, from --seed alone (a few seconds; ablate.py's data):
  images/{train,val,test}/<i>.png   96x96 scenes; each split from its own seeds
  scenes_{train,val,test}.jsonl     each image's scene: the ground truth every answer follows from
  stage1.json                       one caption per train image ("plain")
  stage2.json                       one short QA per train image (+ "\nAnswer the question using a
                                    single word or phrase."), plus long-form records: conversational
                                    answers to the same questions (no format prompt) and detailed
                                    descriptions ("vicuna_v1")
  eval_questions.jsonl / eval_answers.jsonl, val_questions.jsonl / val_answers.jsonl
                                    per kind (category) 80 short questions, then the long-form
                                    requests ("conv", "describe"); answers carry the scene
  stage2_noprompt.json, eval_questions_noprompt.jsonl   the same without the format prompt
  tokenizer.json                    BPE on the train text, as the toy's
  build.json                        the seed and sizes it was built with (ablate.py checks them)
Val and test leave out every scene whose layout (all but the digits) a train scene has.
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from contextlib import ExitStack
from multiprocessing import Pool

from tqdm import tqdm

from nanollava import conversation, files
from nanollava.conversation import SHORT_ANSWER
from nanollava.data import check_record, image_path, load_json, open_image, truncate
from nanollava.tokenizer import Tokenizer, train_bpe


# ---------------------------------------------------------------------------------------------
# validation

def _open_check(path):
    """(path, None) if the image decodes, else (path, (reason, message))."""
    try:
        open_image(path)
        return path, None
    except FileNotFoundError as e:
        return path, ("missing image file", str(e))
    except ValueError as e:
        msg = str(e)
        reason = "zero-size image" if ("0 bytes" in msg or "zero size" in msg) else "unreadable/corrupt image"
        return path, (reason, msg)


def validate(records, image_folder, tokenizer=None, template="vicuna_v1", num_image_tokens=576,
             max_length=None, workers=1, desc="validate", decoded=None):
    """One pass over `records`. Returns (good_records, index_rows, problems, counts).

    problems: list of (status, record number, record id, reason, message), status one of
    "broken" (malformed / bad image: dropped), "skipped" (too long to truncate: dropped),
    "truncated" (kept, will be cut at max_length by the dataset).
    """
    problems, parsed = [], []
    for i, rec in enumerate(records):
        rid = rec.get("id", i) if isinstance(rec, dict) else i
        try:
            paths = [image_path(image_folder, p) for p in check_record(rec)]
        except ValueError as e:
            msg = str(e)
            reason = ("image path escapes the folder" if "escapes" in msg else
                      "text is not valid Unicode" if "not valid Unicode" in msg else
                      "no conversations" if "no 'conversations'" in msg else
                      "turns not alternating human/gpt" if "alternate" in msg or "must end" in msg else
                      "<image> without an image" if "without an image" in msg else
                      "image without <image>" if "no <image> tag" in msg else
                      "more <image> tags than images" if "more <image>" in msg else
                      "empty assistant reply" if "empty assistant" in msg else "malformed record")
            problems.append(("broken", i, rid, reason, msg))
            continue
        try:                                        # the output must be able to hold it
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError, TypeError, ValueError) as e:
            problems.append(("broken", i, rid, "cannot be written as UTF-8 JSON", f"{type(e).__name__}: {e}"))
            continue
        parsed.append((i, rid, rec, paths))

    # decode every distinct image once, in parallel
    decoded = set() if decoded is None else decoded   # paths already known to decode (toy: 2 stages)
    all_paths = sorted({p for _, _, _, paths in parsed for p in paths} - decoded)
    bad_image = {}
    pool = Pool(workers) if workers > 1 and len(all_paths) > 256 else None
    try:
        it = pool.imap(_open_check, all_paths, chunksize=64) if pool else map(_open_check, all_paths)
        for path, err in tqdm(it, total=len(all_paths), desc=f"{desc}: images", leave=False,
                              disable=len(all_paths) < 2000):
            if err:
                bad_image[path] = err
            else:
                decoded.add(path)
    finally:
        if pool:
            pool.close()
            pool.join()

    good, index = [], []
    for i, rid, rec, paths in parsed:
        errs = [bad_image[p] for p in paths if p in bad_image]
        if errs:
            problems.append(("broken", i, rid, errs[0][0], errs[0][1]))
            continue
        n = len(paths)
        if tokenizer is not None:
            try:
                ids, labels = conversation.tokenize(rec["conversations"], tokenizer, template, [0] * n)
            except ValueError as e:
                problems.append(("broken", i, rid, "cannot be tokenized", str(e)))
                continue
            text_tokens = len(ids)
            if max_length is not None and text_tokens + n * num_image_tokens > max_length:
                full, lab = conversation.tokenize(rec["conversations"], tokenizer, template,
                                                  [num_image_tokens] * n)
                image_id = tokenizer.image_token_id if n else -1
                length = len(full)
                if truncate(full, lab, image_id, max_length, [num_image_tokens] * n) is None:
                    problems.append(("skipped", i, rid, "longer than max length",
                                     f"{length} tokens > max_length {max_length} and cannot be "
                                     "truncated without splitting an image or losing every reply"))
                    continue
                problems.append(("truncated", i, rid, "longer than max length (truncated)",
                                 f"{length} tokens > max_length {max_length}; kept, truncated"))
        else:
            text_tokens = sum(len(t["value"].split()) for t in rec["conversations"])  # estimate
        good.append(rec)
        index.append(dict(id=rid, n_images=n, text_tokens=text_tokens))
    counts = Counter((status, reason) for status, _, _, reason, _ in problems)
    return good, index, problems, counts, tokenizer is None


def write_outputs(out, stem, good, index, problems, source, image_folder, template,
                  num_image_tokens, max_length, estimated):
    """X.json, X.index.json, X.report.txt: all three are written in full before any replaces its
    old version, so a failure leaves the previous outputs (a matching set) in place."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{stem}{ext}") for ext in (".json", ".index.json", ".report.txt")]
    report = "".join(f"{status}\trecord {i} (id {rid})\t{reason}\t{msg}\n"
                     for status, i, rid, reason, msg in problems)
    texts = [json.dumps(good, ensure_ascii=False),
             json.dumps(dict(source=source, image_folder=image_folder, template=template,
                             num_image_tokens=num_image_tokens, max_length=max_length,
                             tokens_estimated=estimated, records=index)),
             report.encode("utf-8", "backslashreplace").decode("utf-8")]   # a bad id is still reported
    write_all(dict(zip(paths, texts)))
    return paths


def write_all(texts):
    """{path: text}: each written to path.tmp and fsynced, then all renamed (files.atomic_write)."""
    with ExitStack() as stack:
        for path, text in texts.items():
            stack.enter_context(files.atomic_write(path)).write(text)


def print_summary(name, n_total, good, problems, counts):
    n_broken = sum(1 for p in problems if p[0] == "broken")
    n_skipped = sum(1 for p in problems if p[0] == "skipped")
    n_trunc = sum(1 for p in problems if p[0] == "truncated")
    print(f"{name}: {n_total} records -> {len(good)} good ({n_trunc} will be truncated), "
          f"{n_broken} broken, {n_skipped} skipped")
    for (status, reason), c in sorted(counts.items()):
        print(f"  {status:9s} {c:7d}  {reason}")
    for status, i, rid, reason, msg in problems[:10]:
        if status != "truncated":                   # a lone surrogate in an id or message is escaped
            print(f"  e.g. record {i} (id {rid}): {msg}".encode("utf-8", "backslashreplace").decode("utf-8"))


def prep(args):
    if not os.path.isdir(args.image_folder):
        sys.exit(f"error: image folder not found: {args.image_folder}")
    try:
        records = load_json(args.json)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    stem = os.path.splitext(os.path.basename(args.json))[0]
    if os.path.realpath(os.path.join(args.out, stem + ".json")) == os.path.realpath(args.json):
        sys.exit(f"error: --out {args.out} would overwrite the input {args.json}; pick another folder")
    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
    if args.max_length and tok is None:
        sys.exit("error: --max-length needs --tokenizer to count tokens")
    good, index, problems, counts, est = validate(
        records, args.image_folder, tok, args.template, args.num_image_tokens, args.max_length,
        args.workers, desc=stem)
    try:
        paths = write_outputs(args.out, stem, good, index, problems, os.path.abspath(args.json),
                              os.path.abspath(args.image_folder), args.template, args.num_image_tokens,
                              args.max_length, est)
    except files.WriteError as e:
        sys.exit(f"error: {e}")
    print_summary(args.json, len(records), good, problems, counts)
    print("wrote " + ", ".join(paths))


# ---------------------------------------------------------------------------------------------
# the toy data set (easy-vqa)

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
CAPTIONS = ("a {x}.", "A {x}.", "the image shows a {x}.", "a single {x}.", "there is a {x} in the image.",
            "a simple drawing of a {x}.", "a picture of a {x}.")
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?",
                   "Write a short caption for the image.", "Give a brief description of the image.",
                   "Summarize the image in a few words.")


def _shape_and_color(questions):
    """Shape and colour of one image from its (question, answer) pairs."""
    shape = color = None
    absent = set()
    for q, a in questions:
        words = q.rstrip("?").split()
        if a in SHAPES:
            shape = a
        elif a in COLORS:
            color = a
        if a in ("yes", "no"):
            negated = "not" in words or "no" in words
            present = (a == "yes") != negated
            if present:
                shape = next((w for w in words if w in SHAPES), shape)
                color = next((w for w in words if w in COLORS), color)
            else:
                absent.update(w for w in words if w in SHAPES + COLORS)
        else:
            color = next((w for w in words if w in COLORS), color)   # "what is the blue shape?"
            if a in COLORS:
                shape = next((w for w in words if w in SHAPES), shape)  # "what color is the circle?"
    # by elimination: "is a rectangle present? no" + "is there a triangle? no" -> circle
    if shape is None and len(set(SHAPES) - absent) == 1:
        shape = (set(SHAPES) - absent).pop()
    if color is None and len(set(COLORS) - absent) == 1:
        color = (set(COLORS) - absent).pop()
    return shape, color


def _per_image(qs, answers, image_ids):
    by_image = {}
    for q, a, i in zip(qs, answers, image_ids):
        by_image.setdefault(int(i), []).append((q, a))
    return by_image


def build_toy(out, seed=0, max_turns=8, workers=1, limit=None):
    """Build the toy data set in `out` (see the module docstring); limit: first N images per split."""
    import easy_vqa
    t0 = time.time()
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    img_root = os.path.join(out, "images")
    splits = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
              "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    if limit is not None:
        for split, ((qs, answers, ids), paths) in list(splits.items()):
            keep = [k for k, i in enumerate(ids) if int(i) < limit]
            splits[split] = ([[x[k] for k in keep] for x in (qs, answers, ids)],
                             {i: p for i, p in paths.items() if int(i) < limit})
    for split, (_, paths) in splits.items():
        os.makedirs(os.path.join(img_root, split), exist_ok=True)
        for i, src in paths.items():
            dst = os.path.join(img_root, split, f"{i}.png")
            if not os.path.isfile(dst) or os.path.getsize(dst) != os.path.getsize(src):
                with files.replacing(dst) as tmp:
                    shutil.copyfile(src, tmp)

    train = _per_image(*splits["train"][0])
    stage1, stage2, unlabeled, partial = [], [], 0, 0
    for i in sorted(train):
        rel = f"train/{i}.png"
        shape, color = _shape_and_color(train[i])
        if shape or color:   # the caption says what the image's own answers say, nothing more
            what = f"{color} {shape}" if shape and color else shape or f"{color} shape"
            partial += not (shape and color)
            caption = rng.choice(CAPTIONS).format(x=what)
            stage1.append(dict(id=f"cap-{i}", image=rel, conversations=[
                {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                {"from": "gpt", "value": caption}]))
        else:
            unlabeled += 1
        qa = list(train[i])
        rng.shuffle(qa)
        for part, start in enumerate(range(0, len(qa), max_turns)):
            turns = []
            for k, (q, a) in enumerate(qa[start:start + max_turns]):
                text = f"{q}\n{SHORT_ANSWER}"
                if k == 0:
                    text = "<image>\n" + text
                turns += [{"from": "human", "value": text}, {"from": "gpt", "value": a}]
            stage2.append(dict(id=f"vqa-{i}-{part}", image=rel, conversations=turns))
    rng.shuffle(stage1)
    rng.shuffle(stage2)

    eval_q, eval_a = [], []
    (qs, answers, ids), _ = splits["test"]
    for k, (q, a, i) in enumerate(zip(qs, answers, ids)):
        category = "yesno" if a in ("yes", "no") else "open"
        eval_q.append(dict(question_id=k, image=f"test/{int(i)}.png", text=f"{q}\n{SHORT_ANSWER}",
                           category=category))
        eval_a.append(dict(question_id=k, answer=a, category=category))

    # tokenizer on the TRAIN split's text (+ the templates' fixed strings); the test split stays unseen
    texts = [t["value"].replace("<image>", "") for r in stage1 + stage2 for t in r["conversations"]]
    texts += [conversation.SYSTEM_USER, conversation.SYSTEM_HUMAN, "USER: ASSISTANT:",
              conversation.MULTIPLE_CHOICE]
    tok = train_bpe(texts, vocab_size=512)
    tok_path = os.path.join(out, "tokenizer.json")
    write_all({tok_path: tok.tok.to_str(pretty=True)})
    tok = Tokenizer.from_file(tok_path)

    written, decoded = [tok_path], set()
    for stem, records, template in (("stage1", stage1, "plain"), ("stage2", stage2, "vicuna_v1")):
        good, index, problems, counts, est = validate(records, img_root, tok, template,
                                                      workers=workers, desc=stem, decoded=decoded)
        if problems:
            raise RuntimeError(f"toy {stem} has bad records: {problems[:3]}")
        written += write_outputs(out, stem, good, index, problems, "easy-vqa", "images", template,
                                 None, None, est)
        print_summary(stem, len(records), good, problems, counts)
    evals = {os.path.join(out, name): "".join(json.dumps(r) + "\n" for r in rows)
             for name, rows in (("eval_questions.jsonl", eval_q), ("eval_answers.jsonl", eval_a))}
    write_all(evals)
    written += list(evals)
    n_img = sum(len(p) for _, p in splits.values())
    print(f"toy data set from easy-vqa in {out}/ ({time.time() - t0:.1f}s):")
    print(f"  images/{{train,test}}/*.png   {n_img} images (64x64)")
    print(f"  stage1.json   {len(stage1)} captions, plain ({partial} name only the shape or the colour, "
          f"{unlabeled} images without a derivable caption)")
    print(f"  stage2.json   {len(stage2)} conversations, vicuna_v1, "
          f"{sum(len(r['conversations']) // 2 for r in stage2)} QA turns")
    print(f"  eval_questions.jsonl / eval_answers.jsonl   {len(eval_q)} questions "
          f"({sum(q['category'] == 'yesno' for q in eval_q)} yes/no)")
    print(f"  tokenizer.json   BPE, {len(tok)} tokens (<unk>={tok.unk_id} <s>={tok.bos_id} "
          f"</s>={tok.eos_id} <pad>={tok.pad_id} <image>={tok.image_token_id})")
    for p in written:
        print(f"  wrote {p}")


# ---------------------------------------------------------------------------------------------
# the shapes benchmark (nanollava/shapes.py)

def shapes_split(seed, split, n, seen=frozenset()):
    """(index, scene) for the n scenes of a split, each from its own seed; scenes whose layout is in `seen`
    (the train split's) are skipped, so no val or test question about a layout was trained on."""
    from nanollava import shapes
    out, i = [], 0
    while len(out) < n:
        scene = shapes.make_scene(shapes.scene_rng(seed, split, i))
        if shapes.layout(scene) not in seen:
            out.append((i, scene))
        i += 1
    return out


def shapes_eval(scenes, split, rng, per_kind, n_long):
    """Eval questions and answers of a split: `per_kind` short questions of each kind (the scenes in
    turn), then n_long conversational and n_long // 2 description requests, on other scenes."""
    from nanollava import shapes
    pools = {k: [] for k in shapes.KINDS}
    for i, scene in scenes:
        for q in shapes.sample_questions(scene, rng):
            pools[q["kind"]].append((i, scene, q))
    rows = [(i, scene, q["kind"], q["question"] + "\n" + SHORT_ANSWER, q["answer"])
            for k in shapes.KINDS for i, scene, q in pools[k][:per_kind]]
    for i, scene, q in rng.sample([x for k in shapes.KINDS for x in pools[k][per_kind:]], n_long):
        rows.append((i, scene, "conv", q["question"], q["answer"]))
    for i, scene in scenes[-(n_long // 2):]:
        rows.append((i, scene, "describe", rng.choice(shapes.DESCRIBE_PROMPTS), shapes.describe(scene)))
    questions = [dict(question_id=f"{split}-{k}", image=f"{split}/{i}.png", text=text, category=kind)
                 for k, (i, _, kind, text, _) in enumerate(rows)]
    answers = [dict(question_id=f"{split}-{k}", answer=answer, category=kind, scene=scene)
               for k, (_, scene, kind, _, answer) in enumerate(rows)]
    return questions, answers


def build_shapes(out, seed=0, n_train=3200, n_eval=600, per_kind=80, n_long=40, workers=1):
    """Build the shapes benchmark in `out` (see the module docstring): train / val / test scenes from
    separate seeds, stage-1 captions and stage-2 QA of the train split, eval files of val and test."""
    from nanollava import shapes
    t0 = time.time()
    train = shapes_split(seed, "train", n_train)
    seen = {shapes.layout(scene) for _, scene in train}
    splits = {"train": train, "val": shapes_split(seed, "val", n_eval, seen),
              "test": shapes_split(seed, "test", n_eval, seen)}
    build = dict(seed=seed, n_train=n_train, n_eval=n_eval, per_kind=per_kind, n_long=n_long)
    texts = {}
    for split, scenes in splits.items():
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        for i, scene in scenes:
            with files.atomic_write(os.path.join(out, "images", split, f"{i}.png"), "wb") as f:
                shapes.render(scene).save(f, format="PNG")
        texts[os.path.join(out, f"scenes_{split}.jsonl")] = "".join(
            json.dumps(dict(image=f"{split}/{i}.png", **scene)) + "\n" for i, scene in scenes)

    rng = random.Random(f"shapes/{seed}/records")
    stage1, stage2 = [], []
    for i, scene in splits["train"]:
        image = f"train/{i}.png"
        stage1.append(dict(id=f"cap-{i}", image=image, conversations=[
            {"from": "human", "value": "<image>\n" + rng.choice(shapes.CAPTION_PROMPTS)},
            {"from": "gpt", "value": shapes.caption(scene)}]))
        qs = shapes.sample_questions(scene, rng)
        q = rng.choice(qs)                                  # one short answer per image, of a random kind
        turns = [(f"{q['question']}\n{SHORT_ANSWER}", q["answer"])]
        if i % 4 == 0:                                      # LLaVA-Instruct's side: conversational answers
            q = rng.choice(qs)
            turns.append((q["question"], q["long"]))
        if i % 8 == 1:                                      # ... and detailed descriptions
            turns.append((rng.choice(shapes.DESCRIBE_PROMPTS), shapes.describe(scene)))
        for k, (question, answer) in enumerate(turns):
            stage2.append(dict(id=f"qa-{i}-{k}", image=image, conversations=[
                {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]))
    rng.shuffle(stage2)

    evals = {}
    for split in ("val", "test"):
        qs, ans = shapes_eval(splits[split], split, random.Random(f"shapes/{seed}/{split}-questions"),
                              per_kind, n_long)
        prefix = "eval" if split == "test" else "val"
        evals[os.path.join(out, f"{prefix}_questions.jsonl")] = "".join(json.dumps(q) + "\n" for q in qs)
        evals[os.path.join(out, f"{prefix}_answers.jsonl")] = "".join(json.dumps(a) + "\n" for a in ans)

    corpus = [t["value"].replace("<image>", "") for r in stage1 + stage2 for t in r["conversations"]]
    corpus += [conversation.SYSTEM_USER, "USER: ASSISTANT:", SHORT_ANSWER]
    tok_path = os.path.join(out, "tokenizer.json")
    write_all({tok_path: train_bpe(corpus, vocab_size=512).tok.to_str(pretty=True), **texts, **evals,
               os.path.join(out, "build.json"): json.dumps(build) + "\n"})      # ablate.py checks it
    tok = Tokenizer.from_file(tok_path)
    # the format ablation (ablate.py): the same stage-2 records and test questions without the prompt
    noprompt = [dict(r, conversations=[dict(t, value=t["value"].replace("\n" + SHORT_ANSWER, ""))
                                       for t in r["conversations"]]) for r in stage2]
    test_qs = [json.loads(line) for line in evals[os.path.join(out, "eval_questions.jsonl")].splitlines()]
    write_all({os.path.join(out, "eval_questions_noprompt.jsonl"): "".join(
        json.dumps(dict(q, text=q["text"].replace("\n" + SHORT_ANSWER, ""))) + "\n" for q in test_qs)})
    for stem, records, template in (("stage1", stage1, "plain"), ("stage2", stage2, "vicuna_v1"),
                                    ("stage2_noprompt", noprompt, "vicuna_v1")):
        good, index, problems, counts, est = validate(records, os.path.join(out, "images"), tok, template,
                                                      workers=workers, desc=stem)
        if problems:
            raise RuntimeError(f"shapes {stem} has bad records: {problems[:3]}")
        write_outputs(out, stem, good, index, problems, "shapes", "images", template, None, None, est)
    kinds = Counter(json.loads(line)["category"] for line in evals[os.path.join(out, "eval_answers.jsonl")].splitlines())
    print(f"shapes benchmark (seed {seed}) in {out}/ ({time.time() - t0:.1f}s): "
          f"{' / '.join(f'{len(v)} {k}' for k, v in splits.items())} images ({shapes.CANVAS}px); "
          f"stage1.json {len(stage1)} captions; stage2.json {len(stage2)} records; "
          f"eval_questions.jsonl {sum(kinds.values())} ({', '.join(f'{k} {n}' for k, n in kinds.items())}); "
          f"tokenizer {len(tok)} tokens")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="LLaVA-format JSON to validate (omit to build the toy data set)")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--out", default=None, help="output folder (toy default: data/toy)")
    p.add_argument("--tokenizer", help="tokenizer.json, to count tokens (exact lengths in the index)")
    p.add_argument("--max-length", type=int, default=None, help="max sequence length (tokens)")
    p.add_argument("--template", default="vicuna_v1", choices=conversation.TEMPLATES,
                   help="conversation template the records will be trained with")
    p.add_argument("--num-image-tokens", type=int, default=576, help="visual tokens per image")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode images")
    p.add_argument("--seed", type=int, default=0, help="seed for the toy's caption phrasing and shuffles")
    p.add_argument("--max-turns", type=int, default=8, help="toy: QA turns per stage-2 conversation")
    p.add_argument("--limit", type=int, default=None,
                   help="toy / shapes: only N images per split (smoke tests; shapes needs at least 24)")
    p.add_argument("--benchmark", choices=("easy-vqa", "shapes"), default="easy-vqa",
                   help="the toy data set to build: easy-vqa (pipeline.py) or the shapes benchmark (ablate.py)")
    args = p.parse_args(argv)
    if args.json is not None and args.benchmark != "easy-vqa":
        p.error(f"--benchmark {args.benchmark} builds a data set; --json validates one: give one of them")
    if args.limit is not None and args.limit < (24 if args.benchmark == "shapes" else 1):
        p.error(f"--limit {args.limit}: {args.benchmark} needs at least {24 if args.benchmark == 'shapes' else 1}")
    if args.json is None and args.benchmark == "shapes":
        build_shapes(args.out or os.path.join("data", "shapes"), args.seed, **(
            dict(n_train=args.limit, n_eval=args.limit, per_kind=4, n_long=4) if args.limit else {}))
        return
    if args.json is None:
        build_toy(args.out or os.path.join("data", "toy"), args.seed, args.max_turns, workers=1,
                  limit=args.limit)
        return
    if args.image_folder is None or args.out is None:
        p.error("--json needs --image-folder and --out")
    prep(args)


if __name__ == "__main__":
    main()
