"""Benchmark scorers, re-implemented exactly from the official evaluation scripts.

LLaVA-1.5 (Table 4 of "Improved Baselines with Visual Instruction Tuning") reports
numbers from a zoo of scorers. Each function below names the script it mirrors,
including its quirks, so our numbers are comparable with the published rows:

- VQA accuracy (VQAv2, VizWiz, TextVQA): EvalAI answer processor
  (`llava/eval/m4c_evaluator.py`, copied from mmf; the same rules as the official
  `vqaEval.py`) + the leave-one-out soft score of `TextVQAAccuracyEvaluator`.
- GQA: `scripts/convert_gqa_for_eval.py` (rstrip('.').lower()) + exact match.
- POPE: `llava/eval/eval_pope.py`.
- ScienceQA: `llava/eval/eval_science_qa.py`.
- MMBench: `llava/eval/eval_mmbench.py` auto_parse_answer + CircularEval.
- MME: `MME_Benchmark/eval_tool/calculation.py`.
- ANLS (DocVQA / ST-VQA) and ChartQA relaxed accuracy (pix2struct).

All functions are pure: strings in, numbers out.
"""

import re

# ----------------------------------------------------------------------------
# VQA answer normalisation (EvalAIAnswerProcessor)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the official table maps this one backwards
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# (?!<=\d) is the official typo for a look-behind: it is a look-ahead that never fails,
# so a period is stripped unless a digit follows it ("2.5" survives, "dogs." does not).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text):
    out = text
    for p in PUNCTUATIONS:
        # a mark touching a space (or any "1,000"-style number) is deleted, else it splits words
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call is PERIOD_STRIP.sub("", out, re.UNICODE): re.UNICODE (32) lands in `count`
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text):
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(s):
    """EvalAIAnswerProcessor.__call__: "Two dogs." -> "2 dogs", "dont" -> "don't"."""
    s = s.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_accuracy(prediction, gt_answers):
    """VQA soft accuracy (TextVQAAccuracyEvaluator / vqaEval.py).

    Both the prediction and the (usually 10) human answers are normalised; the score is
    the mean over the leave-one-out subsets of min(1, #humans that said it / 3).
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    total = gts.count(pred)
    # leaving out answer i removes one match iff answer i itself matched
    accs = [min(1.0, (total - (g == pred)) / 3) for g in gts]
    return sum(accs) / len(accs)


def gqa_accuracy(prediction, gt_answer):
    """GQA: LLaVA's convert_gqa_for_eval.py (rstrip('.').lower()) then exact match."""
    return float(prediction.rstrip(".").lower() == gt_answer)


def exact_match(prediction, gt_answer):
    """Exact match after VQA normalisation (the toy benchmark's open-question accuracy)."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(gt_answer))


# ----------------------------------------------------------------------------
# POPE (llava/eval/eval_pope.py)

def parse_pope_answer(text):
    """First sentence, commas removed; "no" if No/not/no is a word, else "yes". An empty answer is
    None, no answer at all (the official rule would count it as "yes")."""
    if not text.strip():
        return None
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope(answers, labels):
    """Binary yes/no metrics; answers are raw model texts, labels "yes"/"no" (same order).

    A failed question (answer None) or an empty answer counts as the wrong answer: a false
    negative for a "yes" label, a false positive for a "no" one. Returns acc, precision, recall,
    f1, yes_ratio (fractions) and the confusion counts. Undefined ratios (no positive prediction
    / label) are 0.0 instead of a ZeroDivisionError.
    """
    if len(answers) != len(labels):
        raise ValueError(f"pope: {len(answers)} answers but {len(labels)} labels")
    if not answers:
        raise ValueError("pope: no answers to score")
    gold = [lab != "no" for lab in labels]  # the official maps anything but "no" to yes
    parsed = [None if a is None else parse_pope_answer(a) for a in answers]
    preds = [p == "yes" if p is not None else not g for p, g in zip(parsed, gold)]   # None: wrong
    tp = sum(p and g for p, g in zip(preds, gold))
    fp = sum(p and not g for p, g in zip(preds, gold))
    tn = sum(not p and not g for p, g in zip(preds, gold))
    fn = sum(not p and g for p, g in zip(preds, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(acc=(tp + tn) / len(preds), precision=precision, recall=recall, f1=f1,
                yes_ratio=sum(p == "yes" for p in parsed) / len(preds), tp=tp, fp=fp, tn=tn, fn=fn)


def pope_splits(answers, questions, labels_by_split):
    """eval_pope.py __main__: score each split (the question's `category`) separately.

    answers: answer records (question_id, text); questions: question records (question_id,
    category) in file order; labels_by_split: {split: [label record, ...]} in file order
    (coco_pope_{split}.json). As in the official script, the i-th label of a split belongs
    to the i-th question of that category (the label files number their questions from 1
    in every split, the question file does not). A question of a split without an answer counts
    as wrong (text None). Returns {split: pope dict, ..., "mean_f1": ...}.
    """
    category = {q["question_id"]: q["category"] for q in questions}
    by_qid = {}
    for a in answers:
        if a["question_id"] not in category:
            raise ValueError(f"POPE answer question_id {a['question_id']!r} is not in the question file")
        by_qid[a["question_id"]] = a["text"]
    out = {}
    for split, labels in labels_by_split.items():
        qs = [q for q in questions if q["category"] == split]
        if len(qs) != len(labels):
            raise ValueError(f"POPE split {split!r}: {len(qs)} questions but {len(labels)} labels")
        for q, lab in zip(qs, labels):
            if "text" in lab and not q.get("text", "").startswith(lab["text"]):
                raise ValueError(f"POPE split {split!r}: question {q['question_id']} "
                                 f"{q.get('text')!r} does not match label {lab['text']!r}")
        if not any(q["question_id"] in by_qid for q in qs):
            raise ValueError(f"POPE split {split!r}: no answers for any of its {len(qs)} questions")
        pairs = [(by_qid.get(q["question_id"]), lab["label"]) for q, lab in zip(qs, labels)]
        out[split] = pope([p[0] for p in pairs], [p[1] for p in pairs])
        out[split]["n"] = len(pairs)
    out["mean_f1"] = sum(out[s]["f1"] for s in labels_by_split) / len(labels_by_split)
    return out


# ----------------------------------------------------------------------------
# Multiple choice: ScienceQA, MMBench

def parse_scienceqa_letter(text, options="ABCDE"):
    """eval_science_qa.py: a bare letter, "X. ...", or "The answer is X" -> letter, else "FAILED"."""
    text = text.replace("\n", ". ")
    if text.strip() in options:
        return text.strip()
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    m = re.search(r"The answer is ([A-E])", text)  # covers "The answer is X." too
    if m and m.group(1) in options:
        return m.group(1)
    return "FAILED"


def parse_mmbench_letter(text, options):
    """eval_mmbench.py auto_parse_answer (without the ChatGPT fallback): letter or None.

    options: the option texts in order (A, B, C, D ...)."""
    letters = list("ABCD"[:len(options)])
    if text.strip(".").strip().upper() in letters:
        return text.strip(".").strip().upper()
    expanded = [f"The answer is {c}.".lower() in text.lower() for c in letters]
    if any(expanded):
        return letters[expanded.index(True)]
    matched = [letters[i] for i, o in enumerate(options) if text.lower() in o.lower()]
    return matched[0] if len(matched) == 1 else None


def multiple_choice_accuracy(predictions, answers, groups=None):
    """Fraction of predicted letters equal to the answers.

    groups: optional question index per row (MMBench CircularEval): every circular shift
    of a question's options is a row, and a question counts only if all its rows are right.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        raise ValueError("multiple_choice_accuracy: nothing to score")
    right = [p == a for p, a in zip(predictions, answers)]
    if groups is None:
        return sum(right) / len(right)
    per_question = {}
    for g, r in zip(groups, right):
        per_question[g] = per_question.get(g, True) and r
    return sum(per_question.values()) / len(per_question)


# ----------------------------------------------------------------------------
# MME (MME_Benchmark eval_tool/calculation.py)

MME_SUBTASKS = {
    "perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"],
    "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation",
                  "code_reasoning"],
}


def parse_mme_answer(text):
    """calculation.py parse_pred_ans: "yes"/"no" exactly, else look in the first 4 chars."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_scores(records):
    """MME: per subtask acc*100 + acc+*100 (acc+: both questions of an image right), summed.

    records: dicts with category, image, gt ("yes"/"no"), pred (raw text). Returns
    {subtask: score, ..., "perception": sum, "cognition": sum}; a task group that has no
    records is left out.
    """
    tasks = {}
    for r in records:
        gt = r["gt"].lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME record {r}: ground truth must be yes or no")
        img = tasks.setdefault(r["category"], {}).setdefault(r["image"], [])
        img.append(parse_mme_answer(r["pred"]) == gt)
    out = {}
    for cat, images in tasks.items():
        flat = [c for qs in images.values() for c in qs]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(qs) for qs in images.values()) / len(images)
        out[cat] = 100 * acc + 100 * acc_plus
    for group, subtasks in MME_SUBTASKS.items():
        if any(s in out for s in subtasks):
            out[group] = sum(out.get(s, 0.0) for s in subtasks)
    return out


# ----------------------------------------------------------------------------
# ANLS (DocVQA) and relaxed accuracy (ChartQA)

def _levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction, gt_answers, threshold=0.5):
    """Average Normalized Levenshtein Similarity for one question (DocVQA, Biten et al. 2019), as
    the InfographicVQA / DocVQA evaluator that lmms-eval and Qwen-VL copy computes it: edit distance
    between the lower-cased, whitespace-collapsed strings over the longer RAW length, 1 - the
    smallest over the ground truths, 0 below the threshold (so exactly 0.5 scores 0.5)."""
    def norm(s):
        return " ".join(s.strip().lower().split())
    nls = []
    for gt in gt_answers:
        length = max(len(gt.upper()), len(prediction.upper()))      # sic: not the normalised lengths
        nls.append(_levenshtein(norm(gt), norm(prediction)) / length if length else 0.0)
    best = 1.0 - min(nls)
    return best if best >= threshold else 0.0


def relaxed_accuracy(prediction, target, max_relative_change=0.05):
    """ChartQA relaxed correctness (pix2struct): numbers within 5% (a "%" suffix divides by
    100), anything else (or a zero target) by case-insensitive exact match."""
    def to_float(text):
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None
    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= max_relative_change)
    return float(prediction.lower() == target.lower())
