"""
The LLaVA papers' ablations, rerun on a laptop: one command per row, one for all.

    python ablate.py                        # every row, 3 seeds -> OUT/ablations.md + .png (docs/ablations.md)
    python ablate.py --only connector       # one row (<= 15 min on 2 cores once the shared parts exist)
    python ablate.py --only connector --smoke --out /tmp/ablate   # CI: a few steps, one seed

NOT part of LLaVA: the toy's lab. Each row changes one thing in the toy's LLaVA-1.5 recipe (the
small toy ViT + LLaMA of pretrain_toy.py, mlp2x_gelu, stage 1 then stage 2 with the format prompt,
`pad` images, frozen tower; pipeline.py's batch 32 and lr 1e-3 / 2e-3) and trains every variant from
the same starting point with the same budget (one epoch of each stage), on the shapes benchmark
(nanollava/shapes.py: easy-vqa saturates), evaluates it on the test split (eval.py --benchmark
shapes), and appends the row to OUT/results.jsonl. ROWS below is the list of rows: the claim, its
source, the variants and the comparisons a verdict is read from.

Phases, each a real script in a subprocess with ONE torch thread, so a run gives the same numbers
whatever runs beside it (--jobs of them side by side):
  data      data_prep.py --benchmark shapes                (unless DATA holds it)
  pretrain  pretrain_toy.py --size small (and large for the scaling row), vision and text apart
  stage 1   train.py --stage 1, once per (vision tower, LLM, connector, seed)
  stage 2   train.py --stage 2 + eval.py, once per (variant, seed)
Every output lives under OUT and is reused when its key is the same (OUT/*/commands.json: its commands,
the keys of the jobs it starts from, and the data's build.json), so the variant several rows share (the
recipe itself) trains once and an interrupted run resumes. A change to the code is not in the key:
after one, start from a fresh OUT.

Verdict of a claim "A beats B on metric m": reproduced if A > B on every seed (seeds pair the
same stage-1 projector, data order and initialisation), not reproduced if A <= B on every seed,
inconclusive if the seeds disagree.
"""
import argparse
import concurrent.futures
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

from nanollava import benchmarks, toy

LR = {1: 1e-3, 2: 2e-3}          # pipeline.py's toy lr per stage (batch 32 both)
BATCH = 32
SEEDS = (0, 1, 2)
PINPOINTS = "(1x1),(2x2)"        # AnyRes canvases in tiles: a 96 px scene becomes the base view + 2x2 tiles
MAX_NEW_TOKENS = 96              # the long-form answers are ~60 tokens; short ones stop at </s>

# Every variant is the toy's LLaVA-1.5 recipe with one change (train.py flags, or which parts).
VARIANTS = {
    "llava-1.5": {},
    "linear": dict(projector="linear"),
    "no format prompt": dict(data="noprompt"),
    "no stage 1": dict(stage2=["--skip-stage1"]),
    "anyres": dict(stage2=["--image-mode", "anyres", "--image-grid-pinpoints", PINPOINTS]),
    "anyres + pooling": dict(stage2=["--image-mode", "anyres", "--image-grid-pinpoints", PINPOINTS,
                                     "--image-pooling", "after_projector"]),
    "tower at lr/10": dict(stage2=["--train-vision-tower", "--vision-lr", f"{LR[2] / 10:g}"]),
    "tower at lr": dict(stage2=["--train-vision-tower", "--vision-lr", f"{LR[2]:g}"]),
    "LLM +0.43M": dict(llm="large"),
    "ViT +0.42M": dict(vit="large"),
}
COST = {"anyres": 3.4, "anyres + pooling": 1.3, "tower at lr/10": 1.4, "tower at lr": 1.4, "LLM +0.43M": 1.5,
        "ViT +0.42M": 1.3}       # stage-2 time relative to the recipe's, for the ETA and the job order

# The rows: (label, variant) pairs, the metrics shown, and the claims (metric, better, worse) by label.
ROWS = {
    "connector": dict(
        claim="A two-layer MLP connector (mlp2x_gelu) beats LLaVA's linear projection.",
        source="LLaVA-1.5 (Liu et al., *Improved Baselines with Visual Instruction Tuning*, CVPR 2024), "
               "§3.2 'MLP vision-language connector' and Table 2 ('+MLP VL connector')",
        setup="stage 1 and stage 2 with each connector; everything else the recipe",
        variants=[("linear", "linear"), ("mlp2x_gelu", "llava-1.5")],
        metrics=["short/acc", "coarse/acc"],
        claims=[("short/acc", "mlp2x_gelu", "linear")]),
    "format": dict(
        claim="With the response-format prompt ('Answer the question using a single word or phrase.') on "
              "the short-answer data, the model answers short when asked and still answers long-form "
              "requests at length; without it, short-answer and long-form data conflict.",
        source="LLaVA-1.5, §3.2 'Response formatting prompts' and Table 2 ('+Format prompt')",
        setup="stage 2 on the same records with and without the prompt (the same short questions also "
              "appear with conversational long answers, as VQAv2 and LLaVA-Instruct overlap); evaluated on "
              "short questions with the prompt the variant was trained with, and on long-form requests",
        variants=[("without prompt", "no format prompt"), ("with prompt", "llava-1.5")],
        metrics=["short/acc", "conv/long", "conv/acc", "describe/long"],
        claims=[("short/acc", "with prompt", "without prompt"), ("conv/long", "with prompt", "without prompt")]),
    "stage1": dict(
        claim="Stage 1 (projector pre-training on captions) before stage 2 helps.",
        source="LLaVA (Liu et al., *Visual Instruction Tuning*, NeurIPS 2023), §5.2 ScienceQA ablations: "
               "skipping pre-training costs 5.11 points",
        setup="stage 2 from the stage-1 projector vs from a fresh one (--skip-stage1); same stage-2 budget",
        variants=[("no stage 1", "no stage 1"), ("stage 1 + stage 2", "llava-1.5")],
        metrics=["short/acc", "coarse/acc"],
        claims=[("short/acc", "stage 1 + stage 2", "no stage 1")]),
    "resolution": dict(
        claim="Higher input resolution (AnyRes) helps, most on tasks that need detail; resolution matters more "
              "than the number of tokens, so AnyRes with pooling keeps the gain at a fraction of the tokens.",
        source="LLaVA-NeXT (Liu et al., blog, 2024-01-30) 'Dynamic High Resolution'; LLaVA-NeXT ablations "
               "(Li et al., blog 2024-05-25) 'Visual Representations'",
        setup="the base view (the 96 px scene squashed to the tower's 48 px: 36 tokens) vs AnyRes on a 2x2 grid "
              "(base view + 4 full-resolution tiles: 192 tokens) vs AnyRes with 2x2 bilinear pooling of every "
              "view (51 tokens); the digits need the full resolution, the other kinds do not",
        variants=[("base view", "llava-1.5"), ("anyres", "anyres"), ("anyres + pooling", "anyres + pooling")],
        metrics=["detail/acc", "coarse/acc", "short/acc"],
        claims=[("detail/acc", "anyres", "base view"), ("detail/acc", "anyres + pooling", "base view")]),
    "vision": dict(
        claim="Tuning the vision tower in stage 2 helps at a 5-10x smaller lr than the LLM's; at the LLM's lr "
              "it does worse.",
        source="LLaVA-NeXT ablations (Li et al., blog 2024-05-25) 'Training Strategies'; the LLaVA-NeXT "
               "recipe tunes the tower at 2e-6 beside the LLM's 1e-5 / 2e-5",
        setup="stage 2 with the tower frozen, unfrozen at the LLM's lr / 10, unfrozen at the LLM's lr",
        variants=[("frozen", "llava-1.5"), ("tower at lr/10", "tower at lr/10"), ("tower at lr", "tower at lr")],
        metrics=["short/acc", "coarse/acc"],
        claims=[("short/acc", "tower at lr/10", "frozen"), ("short/acc", "tower at lr/10", "tower at lr")]),
    "scaling": dict(
        claim="Adding parameters to the LLM helps more than adding them to the vision tower.",
        source="LLaVA-NeXT ablations (Li et al., blog 2024-05-25) 'Architectures': scaling the LLM is more "
               "effective than scaling the vision encoder",
        setup="pretrain_toy.py --size large: +426K parameters in the LLM (6 layers instead of 4) vs +417K in "
              "the ViT (hidden 96, 6 blocks instead of 64, 4; counting the blocks that run), each pretrained "
              "as the small one; stage 1 and stage 2 as the recipe",
        variants=[("small ViT + small LLM", "llava-1.5"), ("bigger LLM", "LLM +0.43M"), ("bigger ViT", "ViT +0.42M")],
        metrics=["short/acc", "coarse/acc"],
        claims=[("short/acc", "bigger LLM", "bigger ViT")]),
}
METRIC_NAMES = {"short/acc": "short-answer acc", "coarse/acc": "coarse acc", "detail/acc": "detail (digit) acc",
                "conv/long": "long-form kept long", "conv/acc": "long-form answer right",
                "describe/long": "descriptions long"}


# ---------------------------------------------------------------------------------------------
# the runs: commands, cached by their command lines

class Job:
    """A named list of commands run in order in one thread, after the jobs `upstream` (whose outputs it
    reads); done when OUT/.../commands.json holds its key."""

    def __init__(self, name, out, commands, cost, data, upstream=(), after=None):
        self.name, self.out, self.commands, self.cost, self.after = name, out, commands, cost, after
        self.data, self.upstream = data, list(upstream)

    def key(self):
        return dict(commands=self.commands, data=self.data, upstream=[u.key() for u in self.upstream])

    def done(self):
        path = os.path.join(self.out, "commands.json")
        return os.path.isfile(path) and json.load(open(path)) == self.key()

    def run(self, logs):
        if os.path.isdir(self.out):                   # an old or interrupted run: start it afresh
            shutil.rmtree(self.out)
        os.makedirs(self.out)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        t0 = time.time()
        log_path = os.path.join(logs, self.name.replace("/", "_").replace(" ", "_") + ".log")
        with open(log_path, "w") as log:
            for cmd in self.commands:
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                    raise RuntimeError(f"{self.name}: `{' '.join(cmd[1:3])} ...` failed; see {log_path}")
        if self.after:
            self.after(self)
        with open(os.path.join(self.out, "seconds.json"), "w") as f:
            json.dump(round(time.time() - t0, 1), f)
        with open(os.path.join(self.out, "commands.json"), "w") as f:   # last: the job is complete
            json.dump(self.key(), f)


class Plan:
    """The jobs of a set of rows, phase by phase (pretrain, stage 1, stage 2 + eval)."""

    def __init__(self, args, rows, build):
        self.args, self.py = args, sys.executable
        self.data, self.build = args.data, build
        smoke = args.smoke
        self.steps = ["--max-steps", "2", "--schedule-steps", "2"] if smoke else []
        self.seeds = (0,) if smoke else tuple(args.seeds)
        self.variants = sorted({v for r in rows for _, v in ROWS[r]["variants"]}, key=list(VARIANTS).index)
        self.pretrain, self.stage1, self.stage2 = {}, {}, {}
        for v in self.variants:
            for seed in self.seeds:
                self.add_run(v, seed)

    def models(self, size):
        return os.path.join(self.args.out, "models", size)

    def add_pretrain(self, size, part):
        name = f"pretrain/{size}/{part}"
        if name not in self.pretrain:
            cmd = [self.py, "pretrain_toy.py", "--data", self.data, "--out", self.models(size), "--size", size,
                   "--only", part, "--threads", "1", "--seed", "0"]
            if self.args.smoke:
                cmd += ["--vision-steps", "4", "--text-steps", "4"]
            out = os.path.join(self.models(size), "clip" if part == "vision" else "llama")
            self.pretrain[name] = Job(name, out, [cmd], {"vision": 3, "text": 1}[part] * (1 + (size == "large")),
                                      self.build)
        return self.pretrain[name]

    def add_run(self, variant, seed):
        spec = VARIANTS[variant]
        vit, llm = spec.get("vit", "small"), spec.get("llm", "small")
        vision, text = self.add_pretrain(vit, "vision"), self.add_pretrain(llm, "text")
        clip_dir, llm_dir = vision.out, text.out
        tokenizer = os.path.join(self.data, "tokenizer.json")
        projector = ["--projector-type", spec["projector"]] if "projector" in spec else []
        common = ["--vision-tower", clip_dir, "--llm", llm_dir, "--tokenizer", tokenizer, "--image-folder",
                  os.path.join(self.data, "images"), "--global-batch", str(BATCH), "--micro-batch", str(BATCH),
                  "--seed", str(seed), "--device", "cpu", "--log-every", "25"] + projector + self.steps
        s1_name = f"stage1/{vit}-vit-{llm}-llm-{spec.get('projector', 'mlp2x_gelu')}-s{seed}"
        s1_out = os.path.join(self.args.out, s1_name)
        if s1_name not in self.stage1:
            self.stage1[s1_name] = Job(s1_name, s1_out, [
                [self.py, "train.py", "--stage", "1", "--data", os.path.join(self.data, "stage1.json"),
                 "--lr", f"{LR[1]:g}", "--out", os.path.join(s1_out, "train")] + common], 0.4, self.build,
                upstream=[vision, text])
        noprompt = spec.get("data") == "noprompt"
        name = f"runs/{variant}-s{seed}"
        out = os.path.join(self.args.out, name)
        questions = os.path.join(self.data, "eval_questions_noprompt.jsonl" if noprompt else "eval_questions.jsonl")
        train = [self.py, "train.py", "--stage", "2", "--lr", f"{LR[2]:g}", "--out", os.path.join(out, "train"),
                 "--data", os.path.join(self.data, "stage2_noprompt.json" if noprompt else "stage2.json"),
                 "--stage1-out", os.path.join(s1_out, "train")] + common + spec.get("stage2", [])
        evaluate = [self.py, "eval.py", "--model", os.path.join(out, "train", "final"), "--questions", questions,
                    "--image-folder", os.path.join(self.data, "images"), "--answers", os.path.join(out, "answers.jsonl"),
                    "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "32"]
        stage1 = self.stage1[s1_name]
        job = Job(name, out, [train, evaluate], COST.get(variant, 1.0), self.build, upstream=[vision, text, stage1],
                  after=self.score)
        job.questions, job.variant, job.seed = questions, variant, seed
        job.needs = [vision, text, stage1, job]                 # every job the run's numbers come from
        self.stage2[(variant, seed)] = job

    def score(self, job):
        """scores.json beside the answers: eval.py's shapes scores, the visual tokens of a 96 px scene
        and the parameter counts."""
        from nanollava import LLaVA, shapes
        from nanollava.llava import num_image_tokens
        ev = importlib.import_module("eval")
        path = os.path.join(job.out, "answers.jsonl")
        answers = ev.match_questions(benchmarks.read_answers(path), benchmarks.read_jsonl(job.questions), path)
        model = LLaVA.from_pretrained(os.path.join(job.out, "train", "final"))
        params = {part: sum(p.numel() for p in getattr(model, part).parameters())
                  for part in ("vision_tower", "multi_modal_projector", "language_model")}
        with open(os.path.join(job.out, "scores.json"), "w") as f:
            json.dump(dict(scores=benchmarks.score_shapes(answers, os.path.join(self.data, "eval_answers.jsonl"), path),
                           tokens=num_image_tokens(model.config, (shapes.CANVAS, shapes.CANVAS)), params=params), f)

    def phases(self):
        return [("pretrain", list(self.pretrain.values())), ("stage 1", list(self.stage1.values())),
                ("stage 2 + eval", list(self.stage2.values()))]


def run_jobs(phases, jobs, logs):
    """Every job not yet done, phase after phase, `jobs` at a time (longest first), under one progress bar
    weighted by each job's cost (its ETA). Returns (jobs run, jobs in all)."""
    todo = [(name, [j for j in js if not j.done()]) for name, js in phases]
    total = sum(j.cost for _, js in todo for j in js)
    with tqdm(total=round(total, 1), unit="work", dynamic_ncols=True,
              bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} [{elapsed}<{remaining}]") as bar:
        for phase, js in todo:
            bar.set_description(phase)
            with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(j.run, logs): j for j in sorted(js, key=lambda j: -j.cost)}
                for f in concurrent.futures.as_completed(futures):
                    f.result()                             # a failed job stops the run with its log's name
                    bar.update(futures[f].cost)
                    bar.set_postfix_str(futures[f].name, refresh=True)
    return sum(len(js) for _, js in todo), sum(len(js) for _, js in phases)


# ---------------------------------------------------------------------------------------------
# results: mean +- spread over seeds, verdicts, the results file, the report and the chart

def score_of(run, m, variant):
    if m not in run["scores"]:
        raise RuntimeError(f"{variant}: scores.json has no {m} (the test split has none of its questions?)")
    return run["scores"][m]


def row_result(row, plan):
    """{label: {metric: [per seed]}, tokens, params}, and a verdict per claim."""
    spec = ROWS[row]
    variants, jobs = {}, set()
    for label, v in spec["variants"]:
        per_seed = [json.load(open(os.path.join(plan.stage2[(v, s)].out, "scores.json"))) for s in plan.seeds]
        jobs.update(j.out for s in plan.seeds for j in plan.stage2[(v, s)].needs)
        variants[label] = dict(variant=v, seeds=list(plan.seeds), tokens=per_seed[0]["tokens"],
                               params=per_seed[0]["params"],
                               metrics={m: [score_of(r, m, v) for r in per_seed] for m in spec["metrics"]})
    claims = []
    for metric, better, worse in spec["claims"]:
        diffs = [a - b for a, b in zip(variants[better]["metrics"][metric], variants[worse]["metrics"][metric])]
        verdict = ("reproduced" if all(d > 0 for d in diffs) else      # a tie on any seed: inconclusive
                   "not reproduced" if all(d < 0 for d in diffs) else "inconclusive")
        claims.append(dict(metric=metric, better=better, worse=worse, diffs=diffs, verdict=verdict))
    seconds = sum(json.load(open(os.path.join(out, "seconds.json"))) for out in jobs)
    return dict(row=row, variants=variants, claims=claims, cpu_minutes=round(seconds / 60, 1))


def mean_spread(xs):
    """'mean ± sample std' of a list (± 0 for one value)."""
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def row_verdict(result):
    verdicts = {c["verdict"] for c in result["claims"]}
    """The claims' verdicts, once each in order: "reproduced", or "reproduced / not reproduced" for a row of two."""
    return " / ".join(dict.fromkeys(c["verdict"] for c in result["claims"]))


def report(results, header):
    """docs/ablations.md's body: a summary table, then per row the claim, source, setup, table, verdict."""
    lines = header + ["", "| row | claim | result (mean ± std over seeds) | verdict |", "|---|---|---|---|"]
    for r in results:
        spec = ROWS[r["row"]]
        summary = "; ".join(f"{c['better']} − {c['worse']}: {statistics.mean(c['diffs']):+.1f} "
                            f"({METRIC_NAMES[c['metric']]})" for c in r["claims"])
        lines.append(f"| [{r['row']}](#{r['row']}) | {spec['claim']} | {summary} | **{row_verdict(r)}** |")
    lines += ["", "![Every row: each variant's mean per metric, the seeds as dots](ablations.png)"]
    for r in results:
        spec = ROWS[r["row"]]
        lines += ["", f"## {r['row']}", "", f"**Claim.** {spec['claim']}", "", f"**Source.** {spec['source']}.",
                  "", f"**Toy setup.** {spec['setup']}.", "",
                  "**Metric.** " + ", ".join(f"`{m}` ({METRIC_NAMES[m]})" for m in spec["metrics"]) +
                  ", in % on the shapes test split; mean ± sample std over the seeds.", "",
                  "| variant | " + " | ".join(METRIC_NAMES[m] for m in spec["metrics"]) +
                  " | visual tokens | params (ViT / LLM) |",
                  "|---|" + "---:|" * (len(spec["metrics"]) + 2)]
        for label, v in r["variants"].items():
            lines.append(f"| {label} | " + " | ".join(mean_spread(v["metrics"][m]) for m in spec["metrics"]) +
                         f" | {v['tokens']} | {v['params']['vision_tower'] / 1e6:.2f}M / "
                         f"{v['params']['language_model'] / 1e6:.2f}M |")
        lines.append("")
        for c in r["claims"]:
            lines.append(f"- {c['better']} − {c['worse']}, {METRIC_NAMES[c['metric']]}: "
                         f"{statistics.mean(c['diffs']):+.1f} points (per seed "
                         f"{', '.join(f'{d:+.1f}' for d in c['diffs'])}): **{c['verdict']}**")
        lines += ["", f"**Verdict: {row_verdict(r)}.**", "",
                  f"*Cost.* {r['cpu_minutes']} min of one-thread job time (pretraining, stage 1, stage 2 and eval "
                  f"of every variant and seed); `--only {r['row']}` runs these jobs two at a time."]
    return "\n".join(lines) + "\n"


def chart(results, path):
    """One figure, a panel per row: each variant's mean per metric, the seeds as dots, std as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        metrics = ROWS[r["row"]]["metrics"][:2]
        labels = list(r["variants"])
        width = 0.8 / len(metrics)
        for k, m in enumerate(metrics):
            xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(labels))]
            vals = [r["variants"][label]["metrics"][m] for label in labels]
            ax.bar(xs, [statistics.mean(v) for v in vals], width,
                   yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=3,
                   label=METRIC_NAMES[m], color=f"C{k}", alpha=0.75)
            for x, v in zip(xs, vals):
                ax.plot([x] * len(v), v, "k.", markersize=4)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"{r['row']}: {row_verdict(r)}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SMOKE_IMAGES = 48


def data_build(smoke):
    """What data_prep.py's build.json must say for this run: its build_shapes defaults, or the smoke size."""
    import inspect
    import data_prep
    defaults = {k: v.default for k, v in inspect.signature(data_prep.build_shapes).parameters.items()
                if k in ("seed", "n_train", "n_eval", "per_kind", "n_long")}
    return dict(defaults, n_train=SMOKE_IMAGES, n_eval=SMOKE_IMAGES, per_kind=4, n_long=4) if smoke else defaults


def machine():
    """'2-core CPU (model), torch X' for the report."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return f"{os.cpu_count()}-core CPU ({model}), torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=list(ROWS), help="run this row (repeatable; default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one torch thread each")
    p.add_argument("--out", default="out/ablate", help="runs, models, logs, results.jsonl, ablations.md/.png")
    p.add_argument("--data", default=None, help=f"the shapes benchmark (default {toy.SHAPES_DATA_DIR}; built if missing)")
    p.add_argument("--smoke", action="store_true",
                   help="CI: 48 images, 4 pretraining steps, 2 steps per stage, one seed; checks a row comes out")
    args = p.parse_args(argv)
    rows = args.only or list(ROWS)
    args.data = args.data or (os.path.join(args.out, "data") if args.smoke else toy.SHAPES_DATA_DIR)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    t0, started = time.time(), datetime.datetime.now(datetime.timezone.utc)

    build_json = os.path.join(args.data, "build.json")
    if not os.path.isfile(build_json):
        cmd = [sys.executable, "data_prep.py", "--benchmark", "shapes", "--out", args.data, "--seed", "0"]
        if subprocess.run(cmd + (["--limit", str(SMOKE_IMAGES)] if args.smoke else []),
                          stdout=subprocess.DEVNULL).returncode:
            sys.exit(f"ablate.py: {' '.join(cmd)} failed")
    with open(build_json) as f:
        build = json.load(f)
    for key, want in data_build(args.smoke).items():
        if build.get(key) != want:
            sys.exit(f"ablate.py: {build_json}: {key} = {build.get(key)}, but {'--smoke' if args.smoke else 'a full run'} "
                     f"needs {want}: give another --data (or delete {args.data})")
    plan = Plan(args, rows, build)
    ran, total = run_jobs(plan.phases(), args.jobs, logs)

    results = [row_result(r, plan) for r in rows]
    date = started.strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        for r in results:
            f.write(json.dumps(dict(r, date=date, smoke=args.smoke)) + "\n")
    wall = time.time() - t0
    command = "python " + " ".join(["ablate.py"] + (argv if argv is not None else sys.argv[1:]))
    header = ["# LLaVA's ablations, rerun on a laptop", "",
              "Each row trains the toy's LLaVA-1.5 recipe (pretrain_toy.py's small ViT and LLaMA, mlp2x_gelu, stage 1 "
              "then stage 2 with the format prompt, pad images, frozen tower, one epoch of each stage) and the "
              "row's variants of it from the same starting point with the same budget, and scores each on the test "
              "split of the shapes benchmark (nanollava/shapes.py: 96 px scenes of 1-4 objects, each with a digit "
              "that only the full resolution shows; short questions of seven kinds plus long-form requests; "
              "`python data_prep.py --benchmark shapes`). A verdict is *reproduced* when the claim's side wins on "
              "every seed, *not reproduced* when it loses on every seed, *inconclusive* otherwise (a tie included). "
              "These are toy models of about a million parameters trained for minutes: a claim that does not "
              "reproduce here says how far it carries down, not that the paper is wrong.", "",
              "Every seed starts from the same pretrained ViT and LLaMA (pretrain_toy.py --seed 0); the seeds vary "
              "stage 1, stage 2 and the data order, so the spread leaves out pretraining's.", "",
              f"Produced by `{command}` in one run, started {date}; wall time {wall / 60:.1f} min"
              f"{'' if ran == total else f' ({total - ran} of its {total} jobs reused from an earlier run in OUT)'} on a "
              f"{machine()}, {args.jobs} runs side by side with one torch thread each; seeds "
              f"{', '.join(map(str, plan.seeds))}{' (SMOKE: a few steps, not a result)' if args.smoke else ''}."]
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write(report(results, header))
    chart(results, os.path.join(args.out, "ablations.png"))
    print(report(results, header))
    print(f"wrote {args.out}/ablations.md, {args.out}/ablations.png, appended {len(results)} row(s) to "
          f"{args.out}/results.jsonl ({wall / 60:.1f} min)")
    return results


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        sys.exit(f"ablate.py: {e}")
