"""
Evaluate a LLaVA model the way LLaVA-1.5 does (docs/llava.md §6): greedy decoding, the
checkpoint's conversation template and image mode, LLaVA's answer-file schema.

Two modes:

1. generate answers (resumable; question ids already in --answers are skipped):
   python eval.py --model DIR --questions Q.jsonl --image-folder DIR --answers OUT.jsonl

2. score an answer file against ground truth, beside the published LLaVA-1.5-7B row:
   python eval.py --benchmark pope --answers A.jsonl --questions llava_pope_test.jsonl --annotations DIR
   python eval.py --benchmark toy  --answers A.jsonl   # data/toy/eval_{answers,questions}.jsonl by default
   python eval.py --benchmark shapes --answers A.jsonl # data/shapes/..., per-kind accuracy (ablate.py)

The toy benchmark end to end (easy-vqa test split, built by data_prep.py):
   python eval.py --model out/toy/stage2 --questions data/toy/eval_questions.jsonl \\
       --answers out/toy/eval_answers.jsonl --benchmark toy

Both at once: give --model and --benchmark.

What a run guarantees:
  - One question never stops a run. A question that fails (image missing, unreadable, too large
    or outside --image-folder; "<image>" in its text; text that is not valid Unicode; a prompt
    longer than the model's context; a generation error) gets an answer record with an "error"
    field. Errors are final: a rerun skips them like answers (they would fail again), unless
    --retry-errors. Over-long prompts are refused unless --truncate-prompts, which cuts the start
    of the question text (the question and its answer-format line are at its end) with a warning.
  - Every answer record's `metadata` names the model (sha256 of its files and tokenizer) and the
    settings that change answers (template, dtype, max_new_tokens); resuming into an answer file made by
    another model, other settings or another question file is an error. (--truncate-prompts is
    not one of them: it only answers questions that would otherwise fail.)
  - Scoring counts failed and missing answers as wrong, and says how many there were ("missing":
    a question of --questions without an answer). An answer file with duplicate question ids,
    non-object lines, or the ids of another benchmark is refused; so is one whose prompts are
    not --questions' texts (for the toy, eval_questions.jsonl beside the ground truth is used).
"""

import argparse
import hashlib
import json
import sys
import time
import uuid
import warnings
from pathlib import Path

from nanollava import files, metrics
from nanollava.cli import DTYPES, device, positive_int

# LLaVA-1.5-7B, Table 4 of "Improved Baselines with Visual Instruction Tuning"
PUBLISHED_7B = {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "scienceqa": 66.8, "textvqa": 58.2,
                "pope": 85.9, "mme": 1510.7, "mmbench": 64.3}
TOY_GT = {"toy": "data/toy/eval_answers.jsonl", "shapes": "data/shapes/eval_answers.jsonl"}   # data_prep.py
ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


# -----------------------------------------------------------------------------
# answer / question files

def read_jsonl(path, what="file"):
    """Read a jsonl file of JSON objects; a bad line raises a ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        try:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise ValueError(f"{what} {path}, line {i}: not valid JSON ({type(e).__name__}: {e})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{what} {path}, line {i}: expected a JSON object, got {type(rec).__name__}")
                records.append(rec)
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
    return records


def check_ids(records, path, what):
    """Every record has a string or integer question_id, each id once."""
    seen = {}
    for i, rec in enumerate(records, 1):
        qid = rec.get("question_id")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise ValueError(f"{what} {path}, record {i}: question_id must be a string or an integer, got {qid!r}")
        if qid in seen:
            raise ValueError(f"{what} {path}: question_id {qid!r} appears twice (records {seen[qid]} and {i})")
        seen[qid] = i
    return records


def read_answers(path):
    """An answer file to score: LLaVA records, one per question, each with a string `text`."""
    answers = check_ids(read_jsonl(path, "answer file"), path, "answer file")
    for i, a in enumerate(answers, 1):
        if not isinstance(a.get("text"), str):
            raise ValueError(f"answer file {path}, record {i}: no string 'text' (LLaVA answer format)")
    return answers


def load_existing_answers(path, questions, settings, retry_errors=False):
    """Answers already written by an earlier run into `path`, by question id. Each must have been
    made by the same model and settings, for the same question text; anything else is an error
    rather than a silent mix. A torn last line (the process died mid-write) is cut off;
    --retry-errors drops the error records so they are asked again."""
    path = Path(path)
    if not path.is_file():
        return {}
    text_of = {q["question_id"]: q["text"] for q in questions}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done, keep = {}, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"{path}: dropping a torn last line from an interrupted run")
                break
            raise ValueError(f"answer file {path}, line {i + 1}: not valid JSON") from None
        where = f"answer file {path}, line {i + 1}"
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise ValueError(f"{where}: not an answer record (a JSON object with a question_id)")
        qid = rec["question_id"]
        if rec.get("metadata") != settings:
            raise ValueError(f"{where} was made with {rec.get('metadata')!r}, this run is {settings!r}: "
                             f"pass another --answers to answer with this model and these settings")
        if qid not in text_of or rec.get("prompt") != text_of[qid]:
            raise ValueError(f"{where}: question {qid!r} is not in the question file or has another text "
                             f"there: is this answer file for another benchmark?")
        if qid in done:
            raise ValueError(f"{where}: question {qid!r} answered twice")
        if retry_errors and "error" in rec:
            continue
        done[qid] = rec
        keep.append(line if line.endswith("\n") else line + "\n")
    if "".join(keep) != "".join(lines):
        with files.atomic_write(path) as f:
            f.write("".join(keep))
    return done


def model_fingerprint(model_dir, tokenizer_path):
    """sha256 of the model's files (weights, configs) and the tokenizer: what made the answers.
    Reads the weights once (seconds for a 7B model, next to an hour of evaluation)."""
    paths = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model"))
    if Path(tokenizer_path).resolve() not in {p.resolve() for p in paths}:
        paths.append(Path(tokenizer_path))
    h = hashlib.sha256()
    for p in paths:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        h.update(p.name.encode() + digest.digest())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# generation

def fit_prompt(messages, tok, template, num_image_tokens, context, max_new_tokens, truncate=False):
    """Prompt ids of `messages` that leave max_new_tokens of room in the model's context
    (TextConfig.context_length: max_position_embeddings, capped by a sliding window). An over-long
    prompt is a ValueError, or with truncate=True loses the start of the last user turn's text
    (after its "<image>\n" tags), with a warning."""
    from nanollava import conversation

    def build(msgs):
        return conversation.generation_prompt(msgs, tok, template=template, num_image_tokens=num_image_tokens)
    ids, room = build(messages), context - max_new_tokens
    if len(ids) <= room:
        return ids
    if not truncate:
        raise ValueError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {context} positions (--truncate-prompts cuts the question to fit)")
    last = messages[-1]["value"]
    head = "<image>\n" * ((len(last) - len(last.lstrip("<image>\n"))) // len("<image>\n"))   # the images
    body = tok.encode(last[len(head):])
    cut = len(ids) - room
    while cut < len(body):
        msgs = messages[:-1] + [dict(messages[-1], value=head + tok.decode(body[cut:]))]
        ids = build(msgs)
        if len(ids) <= room:
            warnings.warn(f"prompt truncated to {len(ids)} tokens: dropped the first {cut} tokens of the question")
            return ids
        cut += len(ids) - room
    raise ValueError(f"prompt does not fit the model's context of {context} positions with {max_new_tokens} new "
                     f"tokens even without the question text")


def build_prompt(q, image_folder, tok, config, template, max_new_tokens, truncate=False):
    """(prompt ids, [pixels], [(h, w)]) for one question, whose "image" is a path or a list of paths
    (several images: one "<image>\n" each before the text); ValueError / OSError says why not."""
    from nanollava import image as image_lib
    from nanollava.data import image_path, open_image
    if "<image>" in q["text"]:
        raise ValueError("the question text contains '<image>', the image placeholder (eval.py puts it "
                         "in the prompt itself)")
    paths = q.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"'image' must be a path or a list of paths, got {q.get('image')!r:.80}")
    imgs = [open_image(image_path(image_folder, p)) for p in paths]     # escapes, size guards
    processed = image_lib.process_images(imgs, config)                   # RGB (alpha on white, as HF)
    messages = [{"from": "human", "value": "<image>\n" * len(imgs) + q["text"]}]
    ids = fit_prompt(messages, tok, template, [n for _, _, n in processed], config.text.context_length,
                     max_new_tokens, truncate)
    return ids, [p for p, _, _ in processed], [s for _, s, _ in processed]


def collate_left(items, pad_id):
    """Left-pad prompts into one batch (B, T); stack the images (tiles padded for AnyRes)."""
    import torch
    T = max(len(ids) for ids, *_ in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)
    for b, (ids, *_) in enumerate(items):
        input_ids[b, T - len(ids):] = torch.as_tensor(ids)
        attention_mask[b, T - len(ids):] = 1
    from nanollava.data import pad_views
    pixels = [p for _, ps, _ in items for p in ps]                      # every image, row by row
    sizes = [s for _, _, ss in items for s in ss]
    pixel_values = image_sizes = None
    if pixels:
        pixel_values = pad_views(pixels) if pixels[0].dim() == 4 else torch.stack(pixels)   # AnyRes: pad views
        image_sizes = torch.tensor(sizes, dtype=torch.long)
    return input_ids, attention_mask, pixel_values, image_sizes


def generate_texts(model, tok, items, max_new_tokens, device, stop):
    """Greedy answers of a batch of built prompts, each up to its first stop token (the template's)."""
    import torch
    from nanollava.generate import generate
    input_ids, mask, pixel_values, image_sizes = collate_left(items, tok.pad_id)
    with torch.no_grad():
        new = generate(model, input_ids.to(device),
                       pixel_values=None if pixel_values is None else pixel_values.to(device),
                       image_sizes=None if image_sizes is None else image_sizes.to(device),
                       attention_mask=mask.to(device), max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_token_id=stop)
    return [tok.decode(row[:next((k for k, t in enumerate(row) if t in stop), len(row))]).strip()
            for row in new.tolist()]


def answer_questions(model, tok, questions, image_folder, answers_path, batch_size=8,
                     max_new_tokens=128, device="cpu", model_id="nanollava", template=None, settings=None,
                     truncate=False, retry_errors=False):
    """Greedy answers for every question not yet in answers_path, appended batch by batch.
    Returns counts: dict(done, skipped, errors)."""
    from tqdm import tqdm
    from nanollava import conversation
    config = model.config
    template = template or config.template
    stop = conversation.stop_ids(tok, template)
    settings = settings or {}
    done = load_existing_answers(answers_path, questions, settings, retry_errors)
    todo = [q for q in questions if q["question_id"] not in done]
    counts = dict(done=0, skipped=len(questions) - len(todo), errors=0)
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(todo), batch_size), desc="eval", unit="batch",
                      disable=not sys.stderr.isatty()):
        batch = todo[start:start + batch_size]
        items, errors, texts = {}, {}, {}
        for i, q in enumerate(batch):
            try:
                items[i] = build_prompt(q, image_folder, tok, config, template, max_new_tokens, truncate)
            except (OSError, ValueError) as e:   # image missing/unreadable/too large/outside, bad text, too long
                errors[i] = str(e)
        try:
            texts = dict(zip(items, generate_texts(model, tok, list(items.values()), max_new_tokens, device, stop)))
        except (RuntimeError, ValueError):       # one question must not take its batch with it
            for i, item in items.items():
                try:
                    texts[i] = generate_texts(model, tok, [item], max_new_tokens, device, stop)[0]
                except (RuntimeError, ValueError) as e:
                    errors[i] = f"generation failed: {type(e).__name__}: {e}"
        lines = []
        for i, q in enumerate(batch):
            rec = dict(question_id=q["question_id"], prompt=q["text"], text=texts.get(i, ""),
                       answer_id=uuid.uuid4().hex[:22], model_id=model_id, metadata=settings)
            if i in errors:
                rec["error"] = errors[i]
                counts["errors"] += 1
                print(f"question {q['question_id']}: {errors[i]}", file=sys.stderr)
            else:
                counts["done"] += 1
            lines.append(json.dumps(rec))
        files.append_line(answers_path, "\n".join(lines))
    return counts


# -----------------------------------------------------------------------------
# scoring: each returns {metric: value in %} plus "n"; a failed answer (an `error` record) and a
# missing one are wrong, whatever their text

def _check_ids(answers, gt_ids, benchmark, answers_path):
    """Reject an answer file whose question ids are not this benchmark's."""
    if not answers:
        raise ValueError(f"answer file {answers_path} is empty")
    foreign = [a["question_id"] for a in answers if a["question_id"] not in gt_ids]
    if foreign:
        raise ValueError(
            f"answer file {answers_path}: {len(foreign)} of {len(answers)} question_ids are not in the "
            f"{benchmark} ground truth (e.g. {foreign[:3]}): is this an answer file for another benchmark "
            f"or split?")


def _texts(answers):
    """question_id -> answer text, None for a failed question (an `error` record): scored wrong."""
    return {a["question_id"]: (None if "error" in a else a["text"]) for a in answers}


def match_questions(answers, questions, answers_path):
    """The answers of a question file: every answer's prompt must be its question's text (an
    answer file of another benchmark whose ids overlap is refused); a question without an answer
    is added as a missing one (scored wrong)."""
    text_of = {q["question_id"]: q.get("text") for q in questions}
    for a in answers:
        if a["question_id"] not in text_of or a.get("prompt") != text_of[a["question_id"]]:
            raise ValueError(f"answer file {answers_path}: question {a['question_id']!r} is not in the question "
                             f"file or has another text there: is this an answer file for another benchmark?")
    answered = {a["question_id"] for a in answers}
    return answers + [dict(question_id=q["question_id"], prompt=q.get("text", ""), text="", error="no answer",
                           missing=True) for q in questions if q["question_id"] not in answered]


def _failures(answers, unanswered=0):
    """{"failed": error records, "missing": questions without a record}: both are scored as wrong.
    unanswered: ground-truth questions the scorer found no record for."""
    missing = sum(bool(a.get("missing")) for a in answers)
    return {"failed": sum("error" in a for a in answers) - missing, "missing": missing + unanswered}


def score_pope(answers, questions_path, annotation_dir, answers_path="answers"):
    questions = read_jsonl(questions_path, "POPE question file")
    _check_ids(answers, {q["question_id"] for q in questions}, "pope", answers_path)
    splits = sorted(p.name[len("coco_pope_"):-len(".json")] for p in Path(annotation_dir).glob("coco_pope_*.json"))
    if not splits:
        raise FileNotFoundError(f"no coco_pope_*.json label files in {annotation_dir}")
    labels = {s: read_jsonl(Path(annotation_dir) / f"coco_pope_{s}.json", "POPE label file") for s in splits}
    recs = [dict(question_id=k, text=v) for k, v in _texts(answers).items()]
    r = metrics.pope_splits(recs, questions, labels)
    out = {"pope": 100 * r["mean_f1"], "n": sum(r[s]["n"] for s in splits),
           **_failures(answers, len({q["question_id"] for q in questions} - {a["question_id"] for a in answers}))}
    for s in splits:
        for m in ("acc", "precision", "recall", "f1", "yes_ratio"):
            out[f"{s}/{m}"] = 100 * r[s][m]
    return out


def score_vqav2(answers, annotations, answers_path="answers"):
    """VQAv2 val-style annotations: {"annotations": [{question_id, answers: [{answer}]}]}."""
    gt = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in json.load(open(annotations))["annotations"]}
    _check_ids(answers, gt, "vqav2", answers_path)
    texts = _texts(answers)
    scores = [0.0 if t is None else metrics.vqa_accuracy(t, gt[q]) for q, t in texts.items()]
    return {"vqav2": 100 * sum(scores) / len(scores), "n": len(scores), **_failures(answers)}


def _textvqa_question(prompt):
    """eval_textvqa.py prompt_processor: recover the raw question from LLaVA's prompt."""
    import re
    if prompt.startswith("OCR tokens: "):
        return re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL).group(1).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise ValueError(f"TextVQA: cannot find the question in prompt {prompt!r}")


def score_textvqa(answers, annotations, answers_path="answers"):
    """TextVQA_0.5.1_val.json; matched on (image_id == question_id, question) as LLaVA does."""
    gt = {(a["image_id"], a["question"].lower()): a["answers"] for a in json.load(open(annotations))["data"]}
    keys = [(a["question_id"], _textvqa_question(a["prompt"])) for a in answers]
    _check_ids([dict(question_id=k) for k in keys], gt, "textvqa", answers_path)
    scores = [0.0 if "error" in a else metrics.vqa_accuracy(a["text"], gt[k]) for a, k in zip(answers, keys)]
    return {"textvqa": 100 * sum(scores) / len(scores), "n": len(scores), **_failures(answers)}


def score_gqa(answers, annotations, answers_path="answers"):
    """GQA testdev_balanced_questions.json: {question_id: {"answer": ...}}."""
    gt = {str(k): v["answer"] for k, v in json.load(open(annotations)).items()}
    answers = [dict(a, question_id=str(a["question_id"])) for a in answers]
    _check_ids(answers, gt, "gqa", answers_path)
    texts = _texts(answers)
    scores = [0.0 if t is None else metrics.gqa_accuracy(t, gt[q]) for q, t in texts.items()]
    return {"gqa": 100 * sum(scores) / len(scores), "n": len(scores), **_failures(answers)}


def score_scienceqa(answers, annotations, answers_path="answers", split="test"):
    """eval_science_qa.py: problems.json (+ pid_splits.json beside it); a missing answer is
    wrong; IMG accuracy over the problems that have an image (the number LLaVA reports)."""
    problems = json.load(open(annotations))
    splits_file = Path(annotations).with_name("pid_splits.json")
    pids = json.load(open(splits_file))[split] if splits_file.is_file() else list(problems)
    _check_ids(answers, set(pids), "scienceqa", answers_path)
    texts, options = _texts(answers), "ABCDE"
    right = {}
    for pid in pids:
        letter = metrics.parse_scienceqa_letter(texts.get(pid) or "FAILED", options)
        n = len(problems[pid]["choices"])
        right[pid] = letter in options[:n] and options.index(letter) == problems[pid]["answer"]
    img = [pid for pid in pids if problems[pid].get("image")]
    return {"scienceqa": 100 * sum(right[p] for p in img) / max(len(img), 1),
            "all": 100 * sum(right.values()) / len(pids), "n": len(pids),
            **_failures(answers, sum(pid not in texts for pid in pids))}


def score_mme(answers, annotations, answers_path="answers"):
    """MME_Benchmark_release_version dir; question_id is "category/image", as in
    LLaVA's convert_answer_to_mme.py which finds the ground truth by (category, image, question)."""
    root = Path(annotations)
    gt = {}
    for cat in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = cat / "questions_answers_YN" if (cat / "images").is_dir() else cat
        for txt in qa_dir.glob("*.txt"):
            for line in open(txt):
                question, answer = line.strip().split("\t")
                gt[(cat.name, txt.stem, question)] = answer
    def key(qid):  # "artwork/10002.jpg" -> ("artwork", "10002")
        return qid.split("/")[0], qid.split("/")[-1].split(".")[0]
    _check_ids([dict(question_id=key(str(a["question_id"]))) for a in answers],
               {(c, s) for c, s, _ in gt}, "mme", answers_path)
    records = []
    for a in answers:
        cat, stem = key(str(a["question_id"]))
        prompt = a["prompt"].replace("Answer the question using a single word or phrase.", "").strip()
        if "Please answer yes or no." not in prompt:
            prompt += " Please answer yes or no."
            if (cat, stem, prompt) not in gt:
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        if (cat, stem, prompt) not in gt:
            raise ValueError(f"MME: no ground truth for {a['question_id']!r} / {a['prompt']!r}")
        records.append(dict(category=cat, image=stem, gt=gt[(cat, stem, prompt)],
                            pred="" if "error" in a else a["text"]))
    s = metrics.mme_scores(records)
    return {"mme": s.get("perception", 0.0), "cognition": s.get("cognition", 0.0), "n": len(records),
            **_failures(answers),
            **{k: v for k, v in s.items() if k not in ("perception", "cognition")}}


def score_toy(answers, gt_path="data/toy/eval_answers.jsonl", answers_path="answers"):
    """The toy benchmark: easy-vqa test questions from data_prep.py (eval_answers.jsonl:
    question_id, answer, category "open" | "yesno"). Reports exact match after VQA normalisation
    over all questions and over the open ones, and POPE-style metrics over the yes/no ones.
    answers: records or a path."""
    if not isinstance(answers, list):
        answers, answers_path = read_answers(answers), answers
    gts = read_jsonl(gt_path, "toy ground truth")
    gt = {g["question_id"]: g["answer"] for g in gts}
    category = {g["question_id"]: g.get("category", "yesno" if g["answer"] in ("yes", "no") else "open")
                for g in gts}
    _check_ids(answers, gt, "toy", answers_path)
    texts = _texts(answers)
    right = {q: 0.0 if t is None else metrics.exact_match(t, gt[q]) for q, t in texts.items()}
    out = {"toy_acc": 100 * sum(right.values()) / len(right), "n": len(right), **_failures(answers)}
    open_q = [q for q in texts if category[q] == "open"]
    if open_q:
        out["open/acc"] = 100 * sum(right[q] for q in open_q) / len(open_q)
        out["open/n"] = len(open_q)
    yn = [q for q in texts if category[q] == "yesno"]
    if yn:
        r = metrics.pope([texts[q] for q in yn], [gt[q] for q in yn])
        out.update({f"yesno/{m}": 100 * r[m] for m in ("acc", "precision", "recall", "f1", "yes_ratio")})
        out["yesno/n"] = len(yn)
    return out


LONG_WORDS = 6          # shapes: a long-form answer has at least this many words


def score_shapes(answers, gt_path="data/shapes/eval_answers.jsonl", answers_path="answers"):
    """The shapes benchmark (nanollava/shapes.py; data_prep.py --benchmark shapes): exact match after
    VQA normalisation per kind of short question ("color/acc" ... "exist/acc"), over all of them
    ("short/acc"), over the detail kind ("detail/acc": digit) and the coarse ones ("coarse/acc");
    POPE F1 over exist. Long-form requests: the share of answers of at least LONG_WORDS words
    ("conv/long", "describe/long"), and whether a conversational answer's first sentence holds the
    short answer ("conv/acc"). answers: records or a path."""
    from nanollava.shapes import KINDS
    if not isinstance(answers, list):
        answers, answers_path = read_answers(answers), answers
    gts = {g["question_id"]: g for g in read_jsonl(gt_path, "shapes ground truth")}
    _check_ids(answers, gts, "shapes", answers_path)
    texts = _texts(answers)
    by_kind = {}
    for q, t in texts.items():
        by_kind.setdefault(gts[q]["category"], []).append((t or "", gts[q]["answer"], t is None))
    out = {"n": len(texts), **_failures(answers)}

    def acc(rows):
        return 100 * sum(not failed and metrics.exact_match(t, a) for t, a, failed in rows) / len(rows)
    groups = {"short": KINDS, "detail": ("digit",), "coarse": tuple(k for k in KINDS if k != "digit")}
    for group, kinds in groups.items():
        rows = [r for k in kinds for r in by_kind.get(k, [])]
        if rows:
            out[f"{group}/acc"] = acc(rows)
    for kind in KINDS:
        if kind in by_kind:
            out[f"{kind}/acc"] = acc(by_kind[kind])
    if "exist" in by_kind:
        out["exist/f1"] = 100 * metrics.pope([None if f else t for t, _, f in by_kind["exist"]],
                                             [a for _, a, _ in by_kind["exist"]])["f1"]
    for kind in ("conv", "describe"):
        if kind in by_kind:
            out[f"{kind}/long"] = 100 * sum(len(t.split()) >= LONG_WORDS for t, _, _ in by_kind[kind]) / len(by_kind[kind])
    if "conv" in by_kind:
        out["conv/acc"] = 100 * sum(a in metrics.normalize_vqa_answer(t.split(".")[0]).split()
                                    for t, a, _ in by_kind["conv"]) / len(by_kind["conv"])
    return out


def print_table(benchmark, scores):
    """The scores beside the published row, then how many questions failed or had no answer."""
    print(f"{'benchmark':<24}{'score':>12}{'LLaVA-1.5-7B':>14}")
    for k, v in scores.items():
        if k in ("n", "failed", "missing") or k.endswith("/n"):
            continue
        ref = PUBLISHED_7B.get(k)
        print(f"{k:<24}{v:>12.2f}{'' if ref is None else f'{ref:>14.1f}'}")
    print(f"({scores['n']} questions: {scores['failed']} failed, {scores['missing']} without an answer; "
          f"both scored as wrong)")


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (nanollava / llava-hf / original LLaVA)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: MODEL/tokenizer.json)")
    p.add_argument("--template", help="conversation template (default: the checkpoint's)")
    p.add_argument("--questions", help="LLaVA question jsonl: question_id, image, text[, category]")
    p.add_argument("--image-folder", default="data/toy/images",
                   help="directory the question images are relative to (no image may lie outside it)")
    p.add_argument("--answers", required=True, help="answer jsonl: written (resumable) or scored")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="128 short answers, 1024 free-form")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="cut over-long questions to fit the model's context (default: an error record)")
    p.add_argument("--retry-errors", action="store_true", help="ask the questions that failed in an earlier run again")
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark", choices=["pope", "vqav2", "textvqa", "gqa", "scienceqa", "mme", "toy", "shapes"],
                   help="score the answer file against this benchmark's ground truth")
    p.add_argument("--annotations", help="ground truth: POPE label dir, VQAv2/TextVQA/GQA json, "
                                         "ScienceQA problems.json, MME dir, toy / shapes eval_answers.jsonl")
    args = p.parse_args(argv)
    if not args.model and not args.benchmark:
        p.error("give --model (generate answers) and/or --benchmark (score them)")

    if args.model:
        import torch
        from nanollava import LLaVA
        from nanollava.tokenizer import Tokenizer
        if not args.questions:
            p.error("--model needs --questions")
        questions = check_ids(read_jsonl(args.questions, "question file"), args.questions, "question file")
        for i, q in enumerate(questions, 1):
            image = q.get("image", "")
            if not isinstance(q.get("text"), str) or not (isinstance(image, str) or isinstance(image, list) and
                                                          all(isinstance(x, str) for x in image)):
                raise ValueError(f"question file {args.questions}, record {i}: needs a string 'text' (and "
                                 f"'image', if any: a path or a list of paths) in the LLaVA question format, "
                                 f"got keys {sorted(q)}")
        torch.manual_seed(args.seed)
        tok_path = Path(args.tokenizer or Path(args.model) / "tokenizer.json")
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer {tok_path} not found (pass --tokenizer)")
        model = LLaVA.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                                      template=args.template)
        if model.config.template is None:
            raise ValueError(f"{args.model} does not say which conversation template it uses (no chat template in "
                             f"its tokenizer files); pass --template")
        print(f"template: {model.config.template}" + (" (--template)" if args.template else " (from the checkpoint)"))
        tok = Tokenizer.from_file(str(tok_path), image_token_id=model.config.image_token_id)
        context = model.config.text.context_length
        if args.max_new_tokens >= context:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {context} positions")
        settings = dict(model_sha256=model_fingerprint(args.model, tok_path), template=model.config.template,
                        dtype=args.dtype, max_new_tokens=args.max_new_tokens)
        t0 = time.time()
        c = answer_questions(model, tok, questions, args.image_folder, args.answers, args.batch_size,
                             args.max_new_tokens, args.device, Path(args.model).name, settings=settings,
                             truncate=args.truncate_prompts, retry_errors=args.retry_errors)
        print(f"answered {c['done']}, {c['errors']} failed, skipped {c['skipped']} already in the file "
              f"in {time.time() - t0:.1f}s -> {args.answers}")

    if args.benchmark:
        b, ann = args.benchmark, args.annotations
        answers, questions_path = read_answers(args.answers), args.questions
        if b in TOY_GT:                                  # data_prep.py's toys: its ground truth by default
            ann = ann or TOY_GT[b]
        if b in TOY_GT and not questions_path:           # ... and the questions beside it
            beside = Path(ann).with_name("eval_questions.jsonl")
            questions_path = beside if beside.is_file() else None
        if questions_path:                               # another benchmark's answers; unanswered questions
            questions = check_ids(read_jsonl(questions_path, "question file"), questions_path, "question file")
            answers = match_questions(answers, questions, args.answers)
        if b == "toy":
            scores = score_toy(answers, ann, args.answers)
        elif b == "shapes":
            scores = score_shapes(answers, ann, args.answers)
        elif ann is None:
            p.error(f"--benchmark {b} needs --annotations")
        elif b == "pope":
            if not args.questions:
                p.error("--benchmark pope needs --questions (the file with each question's category)")
            scores = score_pope(answers, args.questions, ann, args.answers)
        else:
            scores = {"vqav2": score_vqav2, "textvqa": score_textvqa, "gqa": score_gqa,
                      "scienceqa": score_scienceqa, "mme": score_mme}[b](answers, ann, args.answers)
        print_table(b, scores)
        return scores


def cli(argv=None):
    """main() with bad input reported as one clear line instead of a stack trace."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:          # FileNotFoundError, files.WriteError (a full disk) ...
        sys.exit(f"eval.py: error: {e}")


if __name__ == "__main__":
    cli()
