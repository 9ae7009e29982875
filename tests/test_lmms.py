"""nanollava/lmms.py, the lmms-eval model, run by lmms-eval itself on a local task (a jsonl of
easy-vqa questions, no download). lmms-eval is an optional extra with heavy dependencies: without
it these tests skip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason='lmms-eval is not installed (pip install -e ".[lmms]")')

from test_eval import eval_script, toy  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]

TASK = """task: nanollava_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."
'''


def test_lmms_eval_runs_a_local_task_on_a_nanollava_checkpoint(toy, tmp_path):
    from importlib.metadata import entry_points
    assert any(ep.name == "nanollava" for ep in entry_points(group="lmms_eval.models")), \
        'nanollava is not registered with lmms-eval: pip install -e ".[lmms]"'
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    gts = [json.loads(line) for line in open(toy / "gt.jsonl")]
    qs = [json.loads(line) for line in open(toy / "questions.jsonl")]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for q, g in zip(qs, gts):
            f.write(json.dumps(dict(image=str(toy / "images" / q["image"]), question=q["text"].splitlines()[0],
                                    answer=g["answer"])) + "\n")
    (tasks / "nanollava_toy.yaml").write_text(TASK.format(docs=tmp_path / "docs.jsonl"))
    (tasks / "utils.py").write_text(UTILS)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "nanollava", "--model_args",
                        f"pretrained={toy / 'model'}", "--tasks", "nanollava_toy", "--include_path", str(tasks),
                        "--batch_size", "1", "--output_path", str(out), "--log_samples"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*results.json")]
    assert results, f"lmms-eval wrote no results under {out}: {r.stdout[-2000:]}"
    score = results[0]["results"]["nanollava_toy"]
    assert 0.0 <= score["exact_match,none"] <= 1.0
    samples = sorted((json.loads(line) for p in out.rglob("*nanollava_toy*.jsonl") for line in open(p)),
                     key=lambda s: s["doc_id"])
    # the same greedy answers eval.py gives to the same questions (the same prompt, template and stop)
    eval_script.main(["--model", str(toy / "model"), "--questions", str(toy / "questions.jsonl"), "--image-folder",
                      str(toy / "images"), "--answers", str(tmp_path / "a.jsonl"), "--max-new-tokens", "4"])
    answers = [json.loads(line)["text"] for line in open(tmp_path / "a.jsonl")]
    assert [s["filtered_resps"] for s in samples] == [a.split("\n")[0].strip() for a in answers]
