"""
The whole LLaVA life cycle on the toy, in one command (nanochat "speedrun" style, CPU).

    python pipeline.py                    # 7.0 min measured on 2 CPU cores: data -> pretrain -> stage 1 -> stage 2 -> eval
    python pipeline.py --fast             # a shortened run (300 images, tiny step counts, 32 eval questions): the test
    python pipeline.py --seed 1 --out out/toy_seed1

Phases, each the real script run as a subprocess (so exactly the real code paths run):

  1. data      data_prep.py               easy-vqa -> DATA/: tokenizer, stage1.json (captions,
                                          `plain`), stage2.json (multi-turn QA, `vicuna_v1`), test questions
  2. pretrain  pretrain_toy.py            toy only (not LLaVA): tiny CLIP ViT + tiny LLaMA on the TRAIN split
  3. eval      eval.py                    "no visual training": CLIP + LLaMA + a fresh projector
  4. stage 1   train.py --stage 1         projector only, captions, `plain`
  5. eval      eval.py                    stage-1 projector (LLM still the pretrained one)
  6. stage 2   train.py --stage 2         projector + LLM, multi-turn QA, `vicuna_v1`
  7. eval      eval.py                    the final model
  8. samples   sample.py                  a few held-out test images, greedy answers
  9. results   OUT/results.md             markdown table, and as bars OUT/results.png; training curves
                                          OUT/pretrain_{vision,text}.png, OUT/stage{1,2}/loss.png

Evaluation is the held-out easy-vqa TEST split (never trained on): open-question accuracy
(exact match after VQA normalisation, all questions) and POPE-style yes/no accuracy / F1 over
the yes/no questions (eval.py --benchmark toy).

Toy overrides of the LLaVA-1.5 recipe (docs/llava.md §4; train.py's own defaults stay the recipe's),
all in TOY_TRAIN below: global batch 32 in both stages (the toy has 4K images, not 558K: 256 or
128 would leave a handful of steps per epoch) and a stage-2 lr of 2e-3 instead of 2e-5 (a 1M-parameter
LLaMA pretrained for seconds, not Vicuna-7B). The toy data is built with 2 QA turns per stage-2
conversation (data_prep.py --max-turns 2) instead of 8: with 8, most turns can be answered from
the text of earlier turns ("what color is the circle?" names the shape), a shortcut the LLM learns
instead of looking at the image, and the single-turn eval has no such context (measured: yes/no
F1 84% with 8 turns). Everything else is the recipe: one epoch per stage, cosine with 3% warmup,
AdamW (0.9, 0.999), no weight decay, stage 1 = projector only on `plain` captions, stage 2 = projector + LLM on `vicuna_v1` conversations, vision tower frozen. Answers are
capped at 8 new tokens (they are one word). Determinism: same --seed and --threads -> same table
(times aside).
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

from nanollava import benchmarks, plots, toy

# toy overrides of train.py's LLaVA-1.5 defaults (documented in the module docstring / docs/results.md)
TOY_TRAIN = {
    1: dict(lr=1e-3, global_batch=32, micro_batch=32),      # recipe lr; batch 256 -> 32
    2: dict(lr=2e-3, global_batch=32, micro_batch=32),      # lr 2e-5 -> 2e-3, batch 128 -> 32
}
FAST = dict(images=300, vision_steps=8, text_steps=8, stage1_steps=6, stage2_steps=6, eval_questions=32)
MAX_TURNS = 2               # QA turns per stage-2 conversation (data_prep.py --max-turns; its default is 8)
EVAL_QUESTIONS = 2000       # a fixed, seeded sample of the 9,673 test questions (0 = all)
MAX_NEW_TOKENS = 8          # toy answers are one word + </s>


def run(phase, cmd, log_dir, env):
    """Run one phase's script, echoing its output to the console and OUT/logs/<phase>.log."""
    print(f"\n=== {phase}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(os.path.join(log_dir, f"{phase}.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    dt = time.time() - t0
    if proc.returncode:
        sys.exit(f"pipeline.py: phase {phase} failed (exit {proc.returncode}); see {log_dir}/{phase}.log")
    print(f"=== {phase}: {dt:.1f}s", flush=True)
    return dt


def eval_subset(data, out, n, seed):
    """A fixed, seeded sample of n test questions (all when n == 0), written to OUT/eval_questions.jsonl."""
    with open(os.path.join(data, "eval_questions.jsonl")) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    if n and n < len(questions):
        questions = sorted(random.Random(seed).sample(questions, n), key=lambda q: q["question_id"])
    path = os.path.join(out, "eval_questions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    return path, questions


def assemble(model_dir, clip_dir, llm_dir, projector, seed, tokenizer):
    """A full LLaVA directory from CLIP + LLaMA (+ stage-1 projector), as train.py builds its model.

    With projector=None the projector is freshly initialised (seeded): the "no visual training" row.
    """
    import torch
    from nanollava.checkpoint import load_from_parts
    from nanollava.tokenizer import Tokenizer
    torch.manual_seed(seed)
    tok = Tokenizer.from_file(tokenizer)
    model = load_from_parts(clip_dir, llm_dir, projector=projector, image_token_id=tok.image_token_id,
                                  template="vicuna_v1")
    model.save_pretrained(model_dir)
    shutil.copyfile(tokenizer, os.path.join(model_dir, "tokenizer.json"))
    return model_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="shortened run (tiny step counts, 32 eval questions)")
    p.add_argument("--seed", type=int, default=0, help="one seed for data, init, data order, eval sample")
    p.add_argument("--out", default=toy.OUT_DIR, help="output folder (models, logs, results.md)")
    p.add_argument("--data", default=toy.DATA_DIR, help="toy data folder (data_prep.py writes it)")
    p.add_argument("--eval-questions", type=int, default=None,
                   help=f"test questions per eval, a seeded sample (default {EVAL_QUESTIONS}; 0 = all 9,673)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per phase (OMP_NUM_THREADS)")
    p.add_argument("--skip-data", action="store_true", help="reuse DATA if data_prep.py already built it")
    p.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/clip and OUT/llama if pretrain_toy.py made them")
    args = p.parse_args(argv)

    t_start = time.time()
    out, data = args.out, args.data
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    py = sys.executable
    fast = FAST if args.fast else None
    n_eval = (fast["eval_questions"] if fast else EVAL_QUESTIONS) if args.eval_questions is None else args.eval_questions
    times, scores = {}, {}

    # 1. data
    if args.skip_data and os.path.isfile(os.path.join(data, "stage2.json")):
        times["data"] = 0.0
    else:
        cmd = [py, "data_prep.py", "--out", data, "--seed", str(args.seed), "--max-turns", str(MAX_TURNS)]
        if fast:
            cmd += ["--limit", str(fast["images"])]        # the first N images of each split
        times["data"] = run("data", cmd, logs, env)
    tokenizer = os.path.join(data, "tokenizer.json")
    questions_path, questions = eval_subset(data, out, n_eval, args.seed)

    # 2. toy pretraining (not LLaVA): the stand-ins for CLIP and Vicuna
    cmd = [py, "pretrain_toy.py", "--data", data, "--out", out, "--seed", str(args.seed)]
    if fast:
        cmd += ["--vision-steps", str(fast["vision_steps"]), "--text-steps", str(fast["text_steps"])]
    if args.skip_pretrain and all(os.path.isfile(os.path.join(out, d, "config.json")) for d in ("clip", "llama")):
        times["pretrain"] = 0.0
    else:
        times["pretrain"] = run("pretrain", cmd, logs, env)
    clip_dir, llm_dir = os.path.join(out, "clip"), os.path.join(out, "llama")
    for part in ("vision", "text"):
        with open(os.path.join(out, f"pretrain_{part}.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        plots.training_curves(rows, os.path.join(out, f"pretrain_{part}.png"), f"toy pretraining ({part})")

    def evaluate(name, model_dir):
        answers = os.path.join(out, f"answers_{name}.jsonl")
        if os.path.exists(answers):
            os.remove(answers)                            # eval.py resumes; a new run starts afresh
        t = run(f"eval_{name}", [py, "eval.py", "--model", model_dir, "--questions", questions_path,
                                 "--image-folder", os.path.join(data, "images"), "--answers", answers,
                                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "32",
                                 "--benchmark", "toy", "--annotations", os.path.join(data, "eval_answers.jsonl")],
                logs, env)
        times[f"eval_{name}"] = times.get(f"eval_{name}", 0.0) + t
        scores[name] = score(answers, os.path.join(data, "eval_answers.jsonl"))

    # 3. "no visual training": pretrained CLIP + LLaMA, fresh projector
    t0 = time.time()
    base = assemble(os.path.join(out, "pretrained_only"), clip_dir, llm_dir, None, args.seed, tokenizer)
    times["eval_pretrained"] = time.time() - t0
    evaluate("pretrained", base)

    # 4-5. stage 1: projector only on captions (plain)
    def train(stage, extra):
        hp = TOY_TRAIN[stage]
        # one epoch, as the recipe; --fast stops early with the schedule fitted to the short run
        steps = ["--max-steps", str(fast[f"stage{stage}_steps"]), "--schedule-steps", str(fast[f"stage{stage}_steps"])] \
            if fast else []
        cmd = [py, "train.py", "--stage", str(stage), "--out", os.path.join(out, f"stage{stage}"),
               "--vision-tower", clip_dir, "--llm", llm_dir, "--tokenizer", tokenizer,
               "--data", os.path.join(data, f"stage{stage}.json"), "--image-folder", os.path.join(data, "images"),
               "--lr", str(hp["lr"]), "--global-batch", str(hp["global_batch"]),
               "--micro-batch", str(hp["micro_batch"]), "--seed", str(args.seed), "--device", "cpu",
               "--log-every", "10"] + steps + extra
        times[f"stage{stage}"] = run(f"stage{stage}", cmd, logs, env)

    train(1, [])
    t0 = time.time()
    s1 = assemble(os.path.join(out, "stage1", "model"), clip_dir, llm_dir, os.path.join(out, "stage1"),
                  args.seed, tokenizer)
    times["eval_stage1"] = time.time() - t0
    evaluate("stage1", s1)

    # 6-7. stage 2: projector + LLM on multi-turn QA (vicuna_v1)
    train(2, ["--stage1-out", os.path.join(out, "stage1")])
    evaluate("stage2", os.path.join(out, "stage2", "final"))

    # 8. a few answers on held-out test images
    t0 = time.time()
    samples = []
    for q in questions[:1 if fast else 3]:
        res = subprocess.run([py, "sample.py", "--model", os.path.join(out, "stage2", "final"),
                              "--image", os.path.join(data, "images", q["image"]),
                              "--prompt", q["text"], "--max-new-tokens", str(MAX_NEW_TOKENS)],
                             capture_output=True, text=True, env=env)
        if res.returncode:
            sys.exit(f"pipeline.py: sample.py failed: {res.stderr.strip()}")
        samples.append((q, res.stdout.strip()))
    times["samples"] = time.time() - t0
    times["total"] = time.time() - t_start

    report = results_markdown(args, n_eval, scores, times, samples, data)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    results_chart(scores, os.path.join(out, "results.png"))
    print("\n" + report)
    print(f"wrote {os.path.join(out, 'results.md')}")
    return scores, times


def score(answers, gt):
    """eval.py's toy scorer, as numbers for the table."""
    return benchmarks.score_toy(answers, gt)


ROWS = [("pretrained only (no visual training)", "pretrained", "pretrain"),
        ("after stage 1 (projector, captions)", "stage1", "stage1"),
        ("after stage 2 (projector + LLM, QA)", "stage2", "stage2")]


def results_chart(scores, path):
    """The results table as bars: each model's accuracy (all, open, yes/no) and yes/no F1."""
    columns = [("toy_acc", "accuracy (all)"), ("open/acc", "open-question acc"), ("yesno/acc", "yes/no acc"),
               ("yesno/f1", "yes/no F1")]
    plots.bars({label: {name: scores[key].get(k, 0.0) for k, name in columns} for label, key, _ in ROWS},
               path, f"toy: {scores['stage2']['n']} held-out easy-vqa test questions")


def results_markdown(args, n_eval, scores, times, samples, data):
    gt = {}
    with open(os.path.join(data, "eval_answers.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            gt[r["question_id"]] = r["answer"]
    n = scores["stage2"]["n"]
    n_yn = scores["stage2"].get("yesno/n", 0)
    n_open = scores["stage2"].get("open/n", 0)
    lines = [f"# nanollava toy pipeline (seed {args.seed}{', --fast' if args.fast else ''})", "",
             f"Held-out easy-vqa test split: {n} questions ({n_open} open, {n_yn} yes/no), "
             + ("a seeded sample of the 9,673." if n_eval else "all of them."), "",
             "| model | accuracy (all) | open-question acc | yes/no acc | yes/no F1 | yes ratio | train time "
             "| eval time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, key, phase in ROWS:
        s = scores[key]
        lines.append(f"| {label} | {s['toy_acc']:.1f}% | {s.get('open/acc', 0):.1f}% | {s.get('yesno/acc', 0):.1f}% | "
                     f"{s.get('yesno/f1', 0):.1f}% | {s.get('yesno/yes_ratio', 0):.1f}% | "
                     f"{times[phase]:.0f}s | {times['eval_' + key]:.0f}s |")
    lines += ["", "| phase | time |", "|---|---:|"]
    for k in ("data", "pretrain", "eval_pretrained", "stage1", "eval_stage1", "stage2", "eval_stage2", "samples"):
        lines.append(f"| {k} | {times[k]:.1f}s |")
    lines += [f"| **total** | **{times['total']:.1f}s ({times['total'] / 60:.1f} min)** |", "",
              f"Machine: {os.cpu_count()}-core CPU, {args.threads} threads per phase. "
              f"Training curves: {args.out}/pretrain_{{vision,text}}.png, {args.out}/stage{{1,2}}/loss.png; "
              f"this table as bars: {args.out}/results.png.", "",
              "Sample answers (stage-2 model, held-out test images):", ""]
    for q, answer in samples:
        lines.append(f"- `{q['image']}` {q['text'].splitlines()[0]} -> **{answer}** (truth: {gt[q['question_id']]})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
