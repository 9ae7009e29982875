"""The GPU check command (python -m bench.gpu): without CUDA it says so and exits 0; with CUDA its
steps run with time limits and give one table and a benchmarks.md (plumbing checked here with
stand-in steps; the real steps need a GPU)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU these commands run the real checks (minutes)")
@pytest.mark.parametrize("module", ["bench.gpu", "nanollava.kernels.bench"])
def test_gpu_commands_say_so_and_exit_0_without_cuda(module, tmp_path):
    r = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CUDA" in r.stdout and "nothing" in r.stdout, r.stdout
    assert not os.listdir(tmp_path), "nothing is written without a GPU"


def test_gpu_check_steps_have_time_limits_and_give_one_table(monkeypatch, tmp_path, capsys):
    py = sys.executable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "machine", lambda: "a stand-in GPU")
    monkeypatch.setattr(gpu, "TOY_INPUTS", ("no/such/toy/dir",))
    monkeypatch.setattr(gpu, "steps", lambda work: [
        ("tiles", [[py, "-c", "print('=== 3 passed, 1 skipped in 0.50s ===')"]], 30, "a test step"),
        ("train", [[py, "-c", "pass"]], 30, "needs the toy inputs"),
        ("bench", [[py, "-c", "import time; time.sleep(30)"]], 1, "a step that hangs")])
    assert gpu.main(["--out", str(tmp_path)]) == 1, "a step that timed out is a failure"
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| tiles | a test step | 3 passed, 1 skipped in 0.50s |" in md, md
    assert "SKIPPED: copy the git-ignored no/such/toy/dir" in md and "| bench | a step that hangs | TIMEOUT" in md
    assert "a stand-in GPU" in md and "FAILED: bench" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["bench.log", "benchmarks.md", "tiles.log", "train_metrics.jsonl"]
    assert gpu.main(["--out", str(tmp_path / "again"), "--only", "tiles"]) == 0
    assert sorted(os.listdir(tmp_path / "again")) == ["benchmarks.md", "tiles.log", "train_metrics.jsonl"]
