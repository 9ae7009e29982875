"""
Evaluate a LLaVA model the way LLaVA-1.5 does (REFERENCE §6): greedy decoding, the
checkpoint's conversation template and image mode, LLaVA's answer-file schema.

Two modes:

1. generate answers (resumable; question ids already in --answers are skipped):
   python eval.py --model DIR --questions Q.jsonl --image-folder DIR --answers OUT.jsonl

2. score an answer file against ground truth, beside the published LLaVA-1.5-7B row:
   python eval.py --benchmark pope --answers A.jsonl --questions llava_pope_test.jsonl --annotations DIR
   python eval.py --benchmark toy  --answers A.jsonl   # data/toy/eval_answers.jsonl by default

The toy benchmark end to end (easy-vqa test split, built by data_prep.py):
   python eval.py --model out/toy/stage2 --questions data/toy/eval_questions.jsonl \\
       --answers out/toy/eval_answers.jsonl --benchmark toy

Both at once: give --model and --benchmark.
"""

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from nanollava import metrics

# LLaVA-1.5-7B, Table 4 of "Improved Baselines with Visual Instruction Tuning"
PUBLISHED_7B = {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "scienceqa": 66.8, "textvqa": 58.2,
                "pope": 85.9, "mme": 1510.7, "mmbench": 64.3}
ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


# -----------------------------------------------------------------------------
# answer / question files

def read_jsonl(path, what="file"):
    """Read a jsonl file; a bad line raises a ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what} {path}, line {i}: not valid JSON ({e})") from None
    return records


def load_existing_answers(path):
    """Answers already written by an interrupted run. A torn last line (the process died
    mid-write) is cut off so the file can be appended to again."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines(keepends=True)
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
        done[rec["question_id"]] = rec
        keep.append(line if line.endswith("\n") else line + "\n")
    if "".join(keep) != "".join(lines):
        path.write_text("".join(keep))
    return done


# -----------------------------------------------------------------------------
# generation

def process_image(img, config):
    """image.process with the checkpoint's image mode and resolution: (pixels, (h, w))."""
    from nanollava import image as image_lib
    return image_lib.process(img, mode=config.image_aspect_ratio, image_size=config.vision.image_size,
                             config=config)


def build_prompts(questions, image_folder, tok, config, template, max_prompt_tokens=None):
    """For each question: (prompt ids, pixels or None, (h, w) or None, error or None)."""
    from PIL import Image
    from nanollava import conversation, image as image_lib
    out = []
    for q in questions:
        pixels = size = None
        text = q["text"]
        if q.get("image"):
            path = Path(image_folder) / q["image"]
            try:
                with Image.open(path) as im:
                    pixels, size = process_image(im, config)   # process() converts to RGB (alpha on white, as HF)
            except (OSError, ValueError) as e:  # missing, truncated, not an image
                out.append((None, None, None, f"cannot read image {path}: {e}"))
                continue
            n_img = image_lib.num_image_tokens(size, mode=config.image_aspect_ratio, config=config)
            messages = [{"from": "human", "value": "<image>\n" + text}]
        else:
            n_img = 0
            messages = [{"from": "human", "value": text}]
        ids = conversation.generation_prompt(messages, tok, template=template, num_image_tokens=n_img)
        out.append((ids, pixels, size, None))
    return out


def collate_left(items, pad_id):
    """Left-pad prompts into one batch (B, T); stack the images (tiles padded for AnyRes)."""
    import torch
    T = max(len(ids) for ids, *_ in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)
    for b, (ids, *_) in enumerate(items):
        input_ids[b, T - len(ids):] = torch.as_tensor(ids)
        attention_mask[b, T - len(ids):] = 1
    pixels = [p for _, p, _, _ in items if p is not None]
    sizes = [s for _, p, s, _ in items if p is not None]
    pixel_values = image_sizes = None
    if pixels:
        if pixels[0].dim() == 4:  # AnyRes (n_tiles, 3, H, W): pad to the most tiles
            n = max(p.shape[0] for p in pixels)
            pixels = [torch.cat([p, p.new_zeros(n - p.shape[0], *p.shape[1:])]) for p in pixels]
        pixel_values = torch.stack(pixels)
        image_sizes = torch.tensor(sizes, dtype=torch.long)
    return input_ids, attention_mask, pixel_values, image_sizes


def answer_questions(model, tok, questions, image_folder, answers_path, batch_size=8,
                     max_new_tokens=128, device="cpu", model_id="nanollava", template=None):
    """Greedy answers for every question not yet in answers_path, appended batch by batch.
    Returns counts: dict(done, skipped, errors)."""
    import torch
    from tqdm import tqdm
    from nanollava import conversation
    from nanollava.generate import generate
    config = model.config
    template = template or config.template
    stop = conversation.stop_ids(tok, template)
    done = load_existing_answers(answers_path)
    todo = [q for q in questions if q["question_id"] not in done]
    counts = dict(done=0, skipped=len(questions) - len(todo), errors=0)
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    with open(answers_path, "a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc="eval", unit="batch",
                          disable=not sys.stderr.isatty()):
            batch = todo[start:start + batch_size]
            items = build_prompts(batch, image_folder, tok, config, template)
            ok = [i for i, it in enumerate(items) if it[3] is None]
            texts = {}
            if ok:
                input_ids, mask, pixel_values, image_sizes = collate_left([items[i] for i in ok], tok.pad_id)
                with torch.no_grad():
                    new = generate(model, input_ids.to(device),
                                   pixel_values=None if pixel_values is None else pixel_values.to(device),
                                   image_sizes=None if image_sizes is None else image_sizes.to(device),
                                   attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                   temperature=0.0, eos_token_id=stop)
                for row, i in enumerate(ok):
                    ids = new[row].tolist()
                    ids = ids[:next((k for k, t in enumerate(ids) if t in stop), len(ids))]
                    texts[i] = tok.decode(ids).strip()
            for i, q in enumerate(batch):
                rec = dict(question_id=q["question_id"], prompt=q["text"], text=texts.get(i, ""),
                           answer_id=uuid.uuid4().hex[:22], model_id=model_id, metadata={})
                if items[i][3] is not None:
                    rec["error"] = items[i][3]
                    counts["errors"] += 1
                    print(f"question {q['question_id']}: {items[i][3]}", file=sys.stderr)
                else:
                    counts["done"] += 1
                f.write(json.dumps(rec) + "\n")
            f.flush()
    return counts


# -----------------------------------------------------------------------------
# scoring: each returns {metric: value in %} plus "n"

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
    """question_id -> answer text; records with an `error` field score as an empty answer."""
    return {a["question_id"]: ("" if "error" in a else a["text"]) for a in answers}


def score_pope(answers, questions_path, annotation_dir, answers_path="answers"):
    questions = read_jsonl(questions_path, "POPE question file")
    _check_ids(answers, {q["question_id"] for q in questions}, "pope", answers_path)
    splits = sorted(p.name[len("coco_pope_"):-len(".json")] for p in Path(annotation_dir).glob("coco_pope_*.json"))
    if not splits:
        raise FileNotFoundError(f"no coco_pope_*.json label files in {annotation_dir}")
    labels = {s: read_jsonl(Path(annotation_dir) / f"coco_pope_{s}.json", "POPE label file") for s in splits}
    recs = [dict(question_id=k, text=v) for k, v in _texts(answers).items()]
    r = metrics.pope_splits(recs, questions, labels)
    out = {"pope": 100 * r["mean_f1"], "n": sum(r[s]["n"] for s in splits)}
    for s in splits:
        for m in ("acc", "precision", "recall", "f1", "yes_ratio"):
            out[f"{s}/{m}"] = 100 * r[s][m]
    return out


def score_vqav2(answers, annotations, answers_path="answers"):
    """VQAv2 val-style annotations: {"annotations": [{question_id, answers: [{answer}]}]}."""
    gt = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in json.load(open(annotations))["annotations"]}
    _check_ids(answers, gt, "vqav2", answers_path)
    texts = _texts(answers)
    scores = [metrics.vqa_accuracy(t, gt[q]) for q, t in texts.items()]
    return {"vqav2": 100 * sum(scores) / len(scores), "n": len(scores)}


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
    scores = [metrics.vqa_accuracy("" if "error" in a else a["text"], gt[k]) for a, k in zip(answers, keys)]
    return {"textvqa": 100 * sum(scores) / len(scores), "n": len(scores)}


def score_gqa(answers, annotations, answers_path="answers"):
    """GQA testdev_balanced_questions.json: {question_id: {"answer": ...}}."""
    gt = {str(k): v["answer"] for k, v in json.load(open(annotations)).items()}
    answers = [dict(a, question_id=str(a["question_id"])) for a in answers]
    _check_ids(answers, gt, "gqa", answers_path)
    texts = _texts(answers)
    scores = [metrics.gqa_accuracy(t, gt[q]) for q, t in texts.items()]
    return {"gqa": 100 * sum(scores) / len(scores), "n": len(scores)}


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
        letter = metrics.parse_scienceqa_letter(texts.get(pid, "FAILED"), options)
        n = len(problems[pid]["choices"])
        right[pid] = letter in options[:n] and options.index(letter) == problems[pid]["answer"]
    img = [pid for pid in pids if problems[pid].get("image")]
    return {"scienceqa": 100 * sum(right[p] for p in img) / max(len(img), 1),
            "all": 100 * sum(right.values()) / len(pids), "n": len(pids)}


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
            **{k: v for k, v in s.items() if k not in ("perception", "cognition")}}


def score_toy(answers_path, gt_path="data/toy/eval_answers.jsonl"):
    """The toy benchmark: easy-vqa test questions from data_prep.py (eval_answers.jsonl:
    question_id, answer, category "open" | "yesno"). Reports exact match after VQA normalisation
    over all questions and over the open ones, and POPE-style metrics over the yes/no ones."""
    answers = read_jsonl(answers_path, "answer file")
    gts = read_jsonl(gt_path, "toy ground truth")
    gt = {g["question_id"]: g["answer"] for g in gts}
    category = {g["question_id"]: g.get("category", "yesno" if g["answer"] in ("yes", "no") else "open")
                for g in gts}
    _check_ids(answers, gt, "toy", answers_path)
    texts = _texts(answers)
    right = {q: metrics.exact_match(t, gt[q]) for q, t in texts.items()}
    out = {"toy_acc": 100 * sum(right.values()) / len(right), "n": len(right),
           "errors": sum("error" in a for a in answers)}
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


def print_table(benchmark, scores):
    print(f"{'benchmark':<24}{'score':>12}{'LLaVA-1.5-7B':>14}")
    for k, v in scores.items():
        if k in ("n", "errors") or k.endswith("/n"):
            continue
        ref = PUBLISHED_7B.get(k)
        print(f"{k:<24}{v:>12.2f}{'' if ref is None else f'{ref:>14.1f}'}")
    print(f"({scores['n']} questions{', %d with errors' % scores['errors'] if scores.get('errors') else ''})")


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (nanollava / llava-hf / original LLaVA)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: MODEL/tokenizer.json)")
    p.add_argument("--template", help="conversation template (default: the checkpoint's)")
    p.add_argument("--questions", help="LLaVA question jsonl: question_id, image, text[, category]")
    p.add_argument("--image-folder", default="data/toy/images", help="directory the question images are relative to")
    p.add_argument("--answers", required=True, help="answer jsonl: written (resumable) or scored")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128, help="128 short answers, 1024 free-form")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark", choices=["pope", "vqav2", "textvqa", "gqa", "scienceqa", "mme", "toy"],
                   help="score the answer file against this benchmark's ground truth")
    p.add_argument("--annotations", help="ground truth: POPE label dir, VQAv2/TextVQA/GQA json, "
                                         "ScienceQA problems.json, MME dir, toy eval_answers.jsonl")
    args = p.parse_args(argv)
    if not args.model and not args.benchmark:
        p.error("give --model (generate answers) and/or --benchmark (score them)")

    if args.model:
        import torch
        from nanollava import LLaVA
        from nanollava.tokenizer import Tokenizer
        if not args.questions:
            p.error("--model needs --questions")
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
        questions = read_jsonl(args.questions, "question file")
        for i, q in enumerate(questions, 1):
            if "question_id" not in q or not isinstance(q.get("text"), str):
                raise ValueError(f"question file {args.questions}, record {i}: needs 'question_id' and a "
                                 f"string 'text' (LLaVA question format), got keys {sorted(q)}")
        t0 = time.time()
        c = answer_questions(model, tok, questions, args.image_folder, args.answers, args.batch_size,
                             args.max_new_tokens, args.device, Path(args.model).name)
        print(f"answered {c['done']}, skipped {c['skipped']} already answered, {c['errors']} errors "
              f"in {time.time() - t0:.1f}s -> {args.answers}")

    if args.benchmark:
        answers = read_jsonl(args.answers, "answer file")
        b, ann = args.benchmark, args.annotations
        if b == "toy":
            scores = score_toy(args.answers, ann or "data/toy/eval_answers.jsonl")
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
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")


if __name__ == "__main__":
    cli()
