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

--benchmark reads --questions in that benchmark's official format and asks each question with its
official prompt line (vqav2 vizwiz textvqa gqa pope mme seed scienceqa mmbench chartqa docvqa infovqa
toy; the formats, prompts and scores: nanollava/benchmarks.py and docs/eval.md). The test splits of
VQAv2, VizWiz, DocVQA and InfoVQA are scored by their servers: --upload writes the file they take.
   python eval.py --model DIR --benchmark vqav2 --questions llava_vqav2_mscoco_test-dev2015.jsonl \
       --image-folder test2015 --answers A.jsonl --upload vqav2_upload.json

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
import base64
import hashlib
import json
import sys
import time
import uuid
import warnings
from pathlib import Path

from nanollava import benchmarks, files
from nanollava.benchmarks import read_answers, read_questions
from nanollava.cli import DTYPES, device, positive_int

# LLaVA-1.5-7B, Table 4 of "Improved Baselines with Visual Instruction Tuning"
PUBLISHED_7B = {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "scienceqa": 66.8, "textvqa": 58.2,
                "pope": 85.9, "mme": 1510.7, "mmbench": 64.3, "seed": 58.6}
ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


# -----------------------------------------------------------------------------
# answer files

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
    (several images: one "<image>\n" each before the text), or whose "image_base64" is the image
    itself (MMBench); ValueError / OSError says why not."""
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
    if "image_base64" in q:
        imgs = [open_image(f"the base64 image of question {q['question_id']!r}",
                           data=base64.b64decode(q["image_base64"], validate=True))]
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
    p.add_argument("--questions", help="question file: LLaVA's jsonl (question_id, image, text[, category]), or "
                                       "with --benchmark that benchmark's official file (nanollava/benchmarks.py)")
    p.add_argument("--image-folder", default="data/toy/images",
                   help="directory the question images are relative to (no image may lie outside it)")
    p.add_argument("--answers", required=True, help="answer jsonl: written (resumable) or scored")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="default: the benchmark's (LLaVA: 128, ScienceQA and MMBench 1024; lmms-eval: ChartQA 16, "
                        "DocVQA and InfoVQA 32)")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="cut over-long questions to fit the model's context (default: an error record)")
    p.add_argument("--retry-errors", action="store_true", help="ask the questions that failed in an earlier run again")
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark", choices=benchmarks.BENCHMARKS,
                   help="read --questions in this benchmark's format, ask them with its prompt, score the answers")
    p.add_argument("--annotations", help="ground truth: POPE label dir, VQAv2 / VizWiz / TextVQA / GQA json, "
                                         "ScienceQA problems.json, MME dir, SEED-Bench.json, toy / shapes eval_answers.jsonl "
                                         "(MMBench, ChartQA, DocVQA, InfoVQA: in --questions)")
    p.add_argument("--upload", help="also write the test server's file here (vqav2, vizwiz, docvqa, infovqa)")
    p.add_argument("--plot", help="also draw the scores as bars beside LLaVA-1.5-7B's, to this PNG")
    args = p.parse_args(argv)
    if not args.model and not args.benchmark:
        p.error("give --model (generate answers) and/or --benchmark (score them)")
    b = args.benchmark
    if args.max_new_tokens is None:
        args.max_new_tokens = benchmarks.MAX_NEW_TOKENS.get(b, 128)
    if b in benchmarks.TOY_GT and not args.questions:   # data_prep.py writes the two side by side
        beside = Path(args.annotations or benchmarks.TOY_GT[b]).with_name("eval_questions.jsonl")
        args.questions = str(beside) if beside.is_file() else None
    questions = read_questions(args.questions, b) if args.questions else None

    if args.model:
        import torch
        import sample                                    # here: sample.py imports this module at its top
        if not questions:
            p.error("--model needs --questions")
        torch.manual_seed(args.seed)
        model, tok = sample.load(args.model, args.tokenizer, args.device, args.dtype, args.template)
        tok_path = Path(args.tokenizer or Path(args.model) / "tokenizer.json")      # sample.load read it
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

    if b:
        answers = read_answers(args.answers)
        if questions:                                    # another benchmark's answers; unanswered questions
            answers = match_questions(answers, questions, args.answers)
        scores = benchmarks.score(b, answers, questions, args.annotations, args.answers)
        print_table(b, scores)
        if args.upload:
            if not questions:
                p.error("--upload needs --questions (the upload has a line for every question)")
            with files.atomic_write(args.upload) as f:
                json.dump(benchmarks.upload(b, answers, questions), f)
            print(f"test-server file: {args.upload}")
        if args.plot:
            from nanollava import plots
            shown = {k: v for k, v in scores.items() if k not in ("n", "failed", "missing") and not k.endswith("/n")}
            plots.bars({Path(args.answers).stem: shown}, args.plot, f"{b}: {scores['n']} questions",
                       "score", PUBLISHED_7B, "LLaVA-1.5-7B (published)")
            print(f"plot: {args.plot}")
        return scores


def cli(argv=None):
    """main() with bad input reported as one clear line instead of a stack trace."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:          # FileNotFoundError, files.WriteError (a full disk) ...
        sys.exit(f"eval.py: error: {e}")


if __name__ == "__main__":
    cli()
