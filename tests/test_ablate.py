"""ablate.py end to end at smoke size (one row, one seed, a few steps): the pipeline produces a row,
its report and chart, and the shapes scorer counts what it says. No accuracy is checked here: the
numbers are docs/ablations.md's, from the full command."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanollava import benchmarks

ROOT = Path(__file__).resolve().parent.parent


def ablate(*args):
    r = subprocess.run([sys.executable, "ablate.py", "--only", "connector", "--smoke", *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def answers(out):
    return {p.parent.name: [json.loads(line)["text"] for line in p.read_text().splitlines()]
            for p in sorted((out / "runs").glob("*/answers.jsonl"))}


def test_smoke_row(tmp_path):
    out = tmp_path / "ablate"
    ablate("--out", out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["row"] for row in rows] == ["connector"] and rows[0]["smoke"]
    assert set(rows[0]["variants"]) == {"linear", "mlp2x_gelu"}
    assert rows[0]["claims"][0]["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    report = (out / "ablations.md").read_text()
    assert "SMOKE" in report and "## connector" in report and "reused" not in report
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again into a fresh OUT (same data) retrains everything: the same answers and numbers
    again = tmp_path / "again"
    ablate("--out", again, "--data", out / "data")
    assert answers(again) == answers(out) and len(answers(out)) == 2
    assert json.loads((again / "results.jsonl").read_text())["variants"] == rows[0]["variants"]

    # into the first OUT again, every job is found done (its key matches) and nothing trains
    ablate("--out", out)
    assert "2 of its 2" not in (out / "ablations.md").read_text()
    assert "reused from an earlier run" in (out / "ablations.md").read_text()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    # data built for another run is refused, naming the file, the key and the value
    r = subprocess.run([sys.executable, "ablate.py", "--only", "connector", "--out", tmp_path / "full",
                        "--data", out / "data"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode and "build.json: n_train = 48" in r.stderr


def test_score_shapes_counts_by_kind(tmp_path):
    gt = [dict(question_id="q1", answer="red", category="color"), dict(question_id="q2", answer="7", category="digit"),
          dict(question_id="q3", answer="no", category="exist"), dict(question_id="q4", answer="left", category="conv"),
          dict(question_id="q5", answer="a red circle", category="describe")]
    path = tmp_path / "eval_answers.jsonl"
    path.write_text("".join(json.dumps(g) + "\n" for g in gt))
    answers = [dict(question_id="q1", text="Red."), dict(question_id="q2", text="1"),
               dict(question_id="q3", text="no", error="boom"),          # a failed answer is wrong
               dict(question_id="q4", text="Left. The red circle is to the left of the blue square."),
               dict(question_id="q5", text="A red circle.")]
    s = benchmarks.score("shapes", answers, annotations=str(path))
    assert s["color/acc"] == 100 and s["digit/acc"] == 0 and s["exist/acc"] == 0
    assert s["short/acc"] == pytest.approx(100 / 3) and s["detail/acc"] == 0 and s["coarse/acc"] == 50
    assert s["conv/long"] == 100 and s["conv/acc"] == 100 and s["describe/long"] == 0 and s["failed"] == 1
    # echoing both options of the question is not an answer; a question without a record is wrong
    answers[3] = dict(question_id="q4", text="It is to the left or to the right of the blue square, I think.")
    s = benchmarks.score("shapes", answers[1:], annotations=str(path))
    assert s["conv/acc"] == 0 and s["color/acc"] == 0 and s["missing"] == 1 and s["n"] == 5
