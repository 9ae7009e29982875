"""The benchmarks LLaVA-1.5 and LLaVA-NeXT report: each one's question file, the prompt the model
sees, its ground truth, its score and the file its test server takes (docs/eval.md).

  benchmark  --questions (the official file)            prompt ends with  score             --upload
  vqav2      llava_vqav2_mscoco_test-dev2015.jsonl       SHORT             VQA accuracy      EvalAI json
  vizwiz     llava_test.jsonl (VizWiz)                   VIZWIZ            VQA accuracy      EvalAI json
  textvqa    llava_textvqa_val_v051_ocr.jsonl            SHORT             VQA accuracy
  gqa        llava_gqa_testdev_balanced.jsonl            SHORT             exact match
  pope       llava_pope_test.jsonl                       SHORT             F1 (mean of 3)
  mme        llava_mme.jsonl                             SHORT             acc + acc+
  seed       llava-seed-bench.jsonl                      MULTIPLE_CHOICE   exact letter
  scienceqa  llava_test_CQM-A.json                       MULTIPLE_CHOICE   letter, IMG split
  mmbench    mmbench_dev_20230712.tsv (base64 images)    MULTIPLE_CHOICE   CircularEval
  chartqa    ChartQA test/ (test_human.json, _augmented) CHARTQA           relaxed accuracy
  docvqa     val_v1.0.json (DocVQA)                      SHORT             ANLS              RRC json
  infovqa    infographicsVQA_val_v1.0_withQT.json        SHORT             ANLS              RRC json
  toy        data/toy/eval_questions.jsonl (data_prep)   (as written)      accuracy, yes/no
  shapes     data/shapes/eval_questions.jsonl (data_prep) (as written)     accuracy per kind, long-form share

The LLaVA jsonl files of LLaVA's eval.zip already end with their benchmark's line; for the
others the prompt is built as LLaVA's model_vqa_science.py / model_vqa_mmbench.py
(--single-pred-prompt) and lmms-eval's chartqa / docvqa / infovqa tasks build it. A text that
does not end with its line gets it appended, so a plain question file is asked the official way.
`read_questions` turns every format into LLaVA question records (question_id, image, text, and
the ground truth where the file holds it); each `score_*` takes the answer records (the ones
without an answer added as failed) and returns {metric: percent, "n", "failed", "missing"}.
A failed or missing answer is wrong, whatever its text.
"""

import csv
import json
import sys
from pathlib import Path

from nanollava import metrics
from nanollava.conversation import MULTIPLE_CHOICE, SHORT_ANSWER
from nanollava.files import read_json

VIZWIZ = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER
CHARTQA = "Answer the question with a single word."                     # lmms-eval's chartqa task
PROMPTS = {"vqav2": SHORT_ANSWER, "vizwiz": VIZWIZ, "textvqa": SHORT_ANSWER, "gqa": SHORT_ANSWER,
           "pope": SHORT_ANSWER, "mme": SHORT_ANSWER, "seed": MULTIPLE_CHOICE, "scienceqa": MULTIPLE_CHOICE,
           "mmbench": MULTIPLE_CHOICE, "chartqa": CHARTQA, "docvqa": SHORT_ANSWER, "infovqa": SHORT_ANSWER,
           "toy": None, "shapes": None}
BENCHMARKS = list(PROMPTS)
# LLaVA's max_new_tokens (model_vqa_loader 128; _science and _mmbench 1024), lmms-eval's for the last three
TOY_GT = {"toy": "data/toy/eval_answers.jsonl", "shapes": "data/shapes/eval_answers.jsonl"}   # data_prep.py
MAX_NEW_TOKENS = {"scienceqa": 1024, "mmbench": 1024, "chartqa": 16, "docvqa": 32, "infovqa": 32}


# -----------------------------------------------------------------------------
# question files

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


def _field(rec, key, path, i):
    if key not in rec:
        raise ValueError(f"{path}, record {i}: no {key!r} field (keys: {sorted(rec)}): is this the right file?")
    return rec[key]


def _is_none(value):
    """model_vqa_mmbench.py is_none: an empty cell (pandas NaN), 'nan' or 'none'."""
    return value is None or value.strip().lower() in ("", "nan", "none")


def _mmbench_questions(path):
    """MMBench's TSV, as model_vqa_mmbench.py asks it: hint, question, "A. option" lines. Options
    stop at the first empty one. The circular copies of a question are rows of their own (index
    + k * 1e6, options rotated); their image cell may hold the index of the row with the image."""
    csv.field_size_limit(sys.maxsize)                     # the images are base64 cells
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    images = {r.get("index"): r.get("image") for r in rows}
    out = []
    for i, r in enumerate(rows, 1):
        options = []
        for c in "ABCD":
            if _is_none(r.get(c)):
                break
            options.append(r[c])
        question = _field(r, "question", path, i)
        if not _is_none(r.get("hint")):
            question = r["hint"] + "\n" + question
        image = _field(r, "image", path, i)
        if image.isdigit() and image in images:
            image = images[image]
        out.append(dict(question_id=int(_field(r, "index", path, i)), image_base64=image, category=r.get("category"),
                        text=question + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", options)),
                        options=options, answer=None if _is_none(r.get("answer")) else r["answer"]))
    return out


def _llava_questions(path):
    """LLaVA's question jsonl: question_id, image (a path or a list of paths), text[, category]."""
    questions = read_jsonl(path, "question file")
    for i, q in enumerate(questions, 1):
        image = q.get("image", "")
        if not isinstance(q.get("text"), str) or not (isinstance(image, str) or isinstance(image, list) and
                                                      all(isinstance(x, str) for x in image)):
            raise ValueError(f"question file {path}, record {i}: needs a string 'text' (and 'image', if any: a "
                             f"path or a list of paths) in the LLaVA question format, got keys {sorted(q)}")
    return questions


_FORMATS = {"scienceqa": "LLaVA's llava_test_CQM-A.json", "mmbench": "MMBench's .tsv",
            "chartqa": "ChartQA's test folder or test_*.json", "docvqa": "DocVQA's val_v1.0.json",
            "infovqa": "InfographicVQA's *_withQT.json"}


def read_questions(path, benchmark=None):
    """LLaVA question records (question_id, image, text, + ground truth kept from the file) from a
    benchmark's official question file, each text ending with the benchmark's prompt line."""
    path = Path(path)
    if benchmark == "mmbench":
        questions = _mmbench_questions(path)
    elif benchmark == "scienceqa":                         # model_vqa_science.py
        questions = [dict(question_id=_field(r, "id", path, i), image=r.get("image") or [],
                          text=_field(r, "conversations", path, i)[0]["value"].replace("<image>", "").strip())
                     for i, r in enumerate(read_json(path, "ScienceQA question file"), 1)]
    elif benchmark == "chartqa":                           # {imgname, query, label}, one file per split
        files = [path / "test_human.json", path / "test_augmented.json"] if path.is_dir() else [path]
        questions = [dict(question_id=f"{f.stem.removeprefix('test_')}/{i}", image=_field(r, "imgname", f, i),
                          text=_field(r, "query", f, i), label=str(_field(r, "label", f, i)))
                     for f in files for i, r in enumerate(read_json(f, "ChartQA file"))]
    elif benchmark in ("docvqa", "infovqa"):               # {"data": [{questionId, question, image, answers}]}
        data = read_json(path, f"{benchmark} file")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{path}: expected {{\"data\": [questions]}} ({_FORMATS[benchmark]})")
        questions = [dict(question_id=_field(r, "questionId", path, i), text=_field(r, "question", path, i),
                          image=r["image"] if "image" in r else _field(r, "image_local_name", path, i),
                          answers=r.get("answers"))
                     for i, r in enumerate(data["data"], 1)]
    else:
        questions = _llava_questions(path)
    if benchmark == "mme":          # llava_mme.jsonl: question_id is the image, and each image has 2 questions
        seen = {}
        for q in questions:
            seen[q["question_id"]] = seen.get(q["question_id"], 0) + 1
            q["question_id"] = f"{q['question_id']}#{seen[q['question_id']]}"
    check_ids(questions, path, "question file")
    line = PROMPTS.get(benchmark)
    for q in questions:
        if not isinstance(q["text"], str):
            raise ValueError(f"question file {path}: question {q['question_id']!r} has no text")
        if line and not q["text"].endswith(line):
            q["text"] = q["text"].rstrip() + "\n" + line
    return questions


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


def _failures(answers, unanswered=0):
    """{"failed": error records, "missing": questions without a record}: both are scored as wrong.
    unanswered: ground-truth questions the scorer found no record for."""
    missing = sum(bool(a.get("missing")) for a in answers)
    return {"failed": sum("error" in a for a in answers) - missing, "missing": missing + unanswered}


def _need(value, benchmark, flag, what):
    if value is None:
        raise ValueError(f"--benchmark {benchmark} needs {flag} ({what})")
    return value


def _mean(scores, key, answers):
    return {key: 100 * sum(scores) / len(scores), "n": len(scores), **_failures(answers)}


def score_pope(answers, questions, annotations, answers_path="answers"):
    """eval_pope.py: annotations is the dir of coco_pope_{adversarial,popular,random}.json; the
    questions (llava_pope_test.jsonl) say each one's split."""
    questions = _need(questions, "pope", "--questions", "llava_pope_test.jsonl: each question's split")
    annotation_dir = _need(annotations, "pope", "--annotations", "the dir of coco_pope_*.json")
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


def score_vqav2(answers, questions, annotations, answers_path="answers"):
    """VQAv2 val-style annotations: {"annotations": [{question_id, answers: [{answer}]}]}."""
    gt = {a["question_id"]: [x["answer"] for x in a["answers"]]
          for a in read_json(annotations, "VQAv2 annotation file")["annotations"]}
    _check_ids(answers, gt, "vqav2", answers_path)
    texts = _texts(answers)
    return _mean([0.0 if t is None else metrics.vqa_accuracy(t, gt[q]) for q, t in texts.items()], "vqav2", answers)


def score_vizwiz(answers, questions, annotations, answers_path="answers"):
    """VizWiz val annotations: [{image, question, answers: [{answer, answer_confidence}]}], matched to
    the answers by image (the question file says each question's image); VQA accuracy."""
    questions = _need(questions, "vizwiz", "--questions", "the question file: each question's image")
    gt = {a["image"]: [x["answer"] for x in a["answers"]] for a in read_json(annotations, "VizWiz annotation file")}
    image = {q["question_id"]: q.get("image") for q in questions}
    _check_ids([dict(question_id=image[a["question_id"]]) for a in answers], gt, "vizwiz", answers_path)
    texts = _texts(answers)
    return _mean([0.0 if t is None else metrics.vqa_accuracy(t, gt[image[q]]) for q, t in texts.items()],
                 "vizwiz", answers)


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


def score_textvqa(answers, questions, annotations, answers_path="answers"):
    """TextVQA_0.5.1_val.json; matched on (image_id == question_id, question) as LLaVA does."""
    gt = {(a["image_id"], a["question"].lower()): a["answers"] for a in read_json(annotations, "TextVQA file")["data"]}
    keys = [(a["question_id"], _textvqa_question(a["prompt"])) for a in answers]
    _check_ids([dict(question_id=k) for k in keys], gt, "textvqa", answers_path)
    return _mean([0.0 if "error" in a else metrics.vqa_accuracy(a["text"], gt[k]) for a, k in zip(answers, keys)],
                 "textvqa", answers)


def score_gqa(answers, questions, annotations, answers_path="answers"):
    """GQA testdev_balanced_questions.json: {question_id: {"answer": ...}}."""
    gt = {str(k): v["answer"] for k, v in read_json(annotations, "GQA question file").items()}
    answers = [dict(a, question_id=str(a["question_id"])) for a in answers]
    _check_ids(answers, gt, "gqa", answers_path)
    texts = _texts(answers)
    return _mean([0.0 if t is None else metrics.gqa_accuracy(t, gt[q]) for q, t in texts.items()], "gqa", answers)


def score_scienceqa(answers, questions, annotations, answers_path="answers", split="test"):
    """eval_science_qa.py: problems.json (+ pid_splits.json beside it); a missing answer is
    wrong; IMG accuracy over the problems that have an image (the number LLaVA reports)."""
    problems = read_json(annotations, "ScienceQA problems file")
    splits_file = Path(annotations).with_name("pid_splits.json")
    pids = read_json(splits_file, "ScienceQA split file")[split] if splits_file.is_file() else list(problems)
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


def score_mme(answers, questions, annotations, answers_path="answers"):
    """MME_Benchmark_release_version dir; question_id is "category/image", as in
    LLaVA's convert_answer_to_mme.py which finds the ground truth by (category, image, question)."""
    root = Path(_need(annotations, "mme", "--annotations", "the MME_Benchmark_release_version dir"))
    gt = {}
    for cat in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = cat / "questions_answers_YN" if (cat / "images").is_dir() else cat
        for txt in qa_dir.glob("*.txt"):
            for line in open(txt, encoding="utf-8"):
                question, answer = line.strip().split("\t")
                gt[(cat.name, txt.stem, question)] = answer
    def key(qid):  # "artwork/10002.jpg#2" (read_questions numbers an image's questions) -> ("artwork", "10002")
        return qid.split("/")[0], qid.split("#")[0].split("/")[-1].split(".")[0]
    _check_ids([dict(question_id=key(str(a["question_id"]))) for a in answers],
               {(c, s) for c, s, _ in gt}, "mme", answers_path)
    records = []
    for a in answers:
        cat, stem = key(str(a["question_id"]))
        prompt = a["prompt"].replace(SHORT_ANSWER, "").strip()
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


def score_seed(answers, questions, annotations, answers_path="answers"):
    """convert_seed_for_submission.py: SEED-Bench.json {"questions": [{question_id, answer,
    data_type, question_type_id}]}; right when the answer text IS the letter (no parsing, as LLaVA);
    accuracy over all questions (the number LLaVA reports), the image and the video ones."""
    data = read_json(_need(annotations, "seed", "--annotations", "SEED-Bench.json"), "SEED-Bench file")
    gt = {str(q["question_id"]): q for q in data["questions"]}
    answers = [dict(a, question_id=str(a["question_id"])) for a in answers]
    _check_ids(answers, gt, "seed", answers_path)
    texts = _texts(answers)
    right = {qid: texts.get(qid) == q["answer"] for qid, q in gt.items()}     # not answered: wrong
    out = {"seed": 100 * sum(right.values()) / len(right), "n": len(right),
           **_failures(answers, len(gt) - len(texts))}
    for kind in ("image", "video"):
        ids = [qid for qid, q in gt.items() if q.get("data_type") == kind]
        if ids:
            out[f"seed/{kind}"] = 100 * sum(right[q] for q in ids) / len(ids)
    return out


def score_mmbench(answers, questions, annotations, answers_path="answers"):
    """CircularEval (MMBench): a question counts only if every circular copy (index % 1e6) is
    answered right; letters parsed as eval_mmbench.py without its ChatGPT fallback. "vanilla": the
    rows with index < 1e6 alone."""
    questions = _need(questions, "mmbench", "--questions", "the MMBench .tsv, which holds the answers")
    q_by_id = {q["question_id"]: q for q in questions}
    _check_ids(answers, q_by_id, "mmbench", answers_path)
    if any(q["answer"] is None for q in questions):
        raise ValueError("MMBench: the .tsv has no answer column (a test split): submit the answers instead")
    texts = _texts(answers)
    qids = sorted(texts)
    preds = [None if texts[q] is None else metrics.parse_mmbench_letter(texts[q], q_by_id[q]["options"]) for q in qids]
    gold = [q_by_id[q]["answer"] for q in qids]
    main = [k for k, q in enumerate(qids) if q < 1_000_000]
    return {"mmbench": 100 * metrics.multiple_choice_accuracy(preds, gold, groups=[q % 1_000_000 for q in qids]),
            "mmbench/vanilla": 100 * metrics.multiple_choice_accuracy([preds[k] for k in main], [gold[k] for k in main])
            if main else 0.0, "n": len(qids), **_failures(answers)}


def score_chartqa(answers, questions, annotations, answers_path="answers"):
    """Relaxed accuracy (pix2struct, as lmms-eval's chartqa): over all, human and augmented."""
    questions = _need(questions, "chartqa", "--questions", "the ChartQA test folder, which holds the labels")
    label = {q["question_id"]: q["label"] for q in questions}
    _check_ids(answers, label, "chartqa", answers_path)
    right = {q: 0.0 if t is None else metrics.relaxed_accuracy(t, label[q]) for q, t in _texts(answers).items()}
    out = _mean(list(right.values()), "chartqa", answers)
    for split in ("human", "augmented"):
        ids = [q for q in right if q.startswith(split + "/")]
        if ids:
            out[f"chartqa/{split}"] = 100 * sum(right[q] for q in ids) / len(ids)
    return out


def score_anls(benchmark):
    def score(answers, questions, annotations, answers_path="answers"):
        """ANLS (DocVQA / InfographicVQA val): the answers are in the question file."""
        questions = _need(questions, benchmark, "--questions", "the question file, which holds the answers")
        gts = {q["question_id"]: q["answers"] for q in questions}
        _check_ids(answers, gts, benchmark, answers_path)
        if any(not gts[a["question_id"]] for a in answers):
            raise ValueError(f"{benchmark}: the question file has no answers (a test split): use --upload")
        return _mean([0.0 if t is None else metrics.anls(t, gts[q]) for q, t in _texts(answers).items()],
                     benchmark, answers)
    return score


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
OTHER_OPTION = {"left": "right", "right": "left", "above": "below", "below": "above", "big": "small", "small": "big"}


def score_shapes(answers, gt_path=TOY_GT["shapes"], answers_path="answers"):
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
    texts, by_kind = _texts(answers), {}
    for q, g in gts.items():                 # every ground-truth question: no record counts as wrong
        t = texts.get(q)
        by_kind.setdefault(g["category"], []).append((t or "", g["answer"], t is None))
    out = {"n": len(gts), **_failures(answers, unanswered=len(set(gts) - set(texts)))}

    def acc(rows):
        return 100 * sum(not failed and metrics.exact_match(t, a) for t, a, failed in rows) / len(rows)
    groups = {"short": KINDS, "detail": ("digit",), "coarse": tuple(k for k in KINDS if k != "digit")}
    for group, kinds in groups.items():
        rows = [r for k in kinds for r in by_kind.get(k, [])]
        if rows:
            out[f"{group}/acc"] = acc(rows)
    out.update({f"{kind}/acc": acc(by_kind[kind]) for kind in KINDS if kind in by_kind})
    if "exist" in by_kind:
        out["exist/f1"] = 100 * metrics.pope([None if f else t for t, _, f in by_kind["exist"]],
                                             [a for _, a, _ in by_kind["exist"]])["f1"]
    for kind in ("conv", "describe"):
        if kind in by_kind:
            out[f"{kind}/long"] = 100 * sum(len(t.split()) >= LONG_WORDS for t, _, _ in by_kind[kind]) / len(by_kind[kind])
    if "conv" in by_kind:                    # the answer, and not the other option the question offered
        def says(t, a):
            words = metrics.normalize_vqa_answer(t.split(".")[0]).split()
            return a in words and OTHER_OPTION.get(a) not in words
        out["conv/acc"] = 100 * sum(says(t, a) for t, a, _ in by_kind["conv"]) / len(by_kind["conv"])
    return out


SCORERS = {"pope": score_pope, "vqav2": score_vqav2, "vizwiz": score_vizwiz, "textvqa": score_textvqa,
           "gqa": score_gqa, "scienceqa": score_scienceqa, "mme": score_mme, "seed": score_seed,
           "mmbench": score_mmbench, "chartqa": score_chartqa, "docvqa": score_anls("docvqa"),
           "infovqa": score_anls("infovqa"),
           "toy": lambda answers, questions, gt, path: score_toy(answers, gt or TOY_GT["toy"], path),
           "shapes": lambda answers, questions, gt, path: score_shapes(answers, gt or TOY_GT["shapes"], path)}


# -----------------------------------------------------------------------------
# test-server upload files

def upload(benchmark, answers, questions):
    """The file a benchmark's test server takes, for every question of the question file (a failed
    or missing answer uploads as ""): VQAv2 and VizWiz as LLaVA's convert_{vqav2,vizwiz}_for_submission.py
    write them (answers through the EvalAI answer processor), DocVQA / InfographicVQA as the RRC
    server reads them (lmms-eval's *_test_aggregate_results)."""
    texts = _texts(answers)

    def text(q):
        return texts.get(q["question_id"]) or ""
    if benchmark == "vqav2":
        return [{"question_id": q["question_id"], "answer": metrics.normalize_vqa_answer(text(q))} for q in questions]
    if benchmark == "vizwiz":
        return [{"image": q["image"], "answer": metrics.normalize_vqa_answer(text(q))} for q in questions]
    if benchmark in ("docvqa", "infovqa"):
        return [{"questionId": int(q["question_id"]), "answer": text(q)} for q in questions]
    raise ValueError(f"--upload: no test-server file for {benchmark} (vqav2, vizwiz, docvqa, infovqa have one)")


def score(benchmark, answers, questions=None, annotations=None, answers_path="answers"):
    """SCORERS[benchmark]; vqav2 / vizwiz / docvqa / infovqa without ground truth only count answers
    (their test splits are scored by the server: --upload)."""
    if benchmark in ("vqav2", "vizwiz") and annotations is None or \
            benchmark in ("docvqa", "infovqa") and questions and all(not q.get("answers") for q in questions):
        return {"n": len(answers), **_failures(answers)}
    if benchmark not in ("toy", "shapes", "pope", "mmbench", "chartqa", "docvqa", "infovqa"):
        _need(annotations, benchmark, "--annotations", "the benchmark's ground truth")
    return SCORERS[benchmark](answers, questions, annotations, answers_path)
