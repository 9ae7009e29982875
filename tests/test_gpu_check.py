"""The GPU check command (python -m bench.gpu): without CUDA it says so and exits 0; with CUDA its
steps run with time limits and give one table and a benchmarks.md (plumbing checked here with
stand-in steps); its measurements (bench/gpu_checks.py) run here on CPU at a tiny shape."""
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
    rows = '[["decode at batch 1", "100 tok/s = 75% of the bound", ">= 70%"], ["second row", "x", "-"]]'
    monkeypatch.setattr(gpu, "steps", lambda work: [
        ("tiles", [[py, "-c", "print('=== 3 passed, 1 skipped in 0.50s ===')"]], 30, "a test step"),
        ("decode", [[py, "-c", f"open({os.path.join(work, 'decode.json')!r}, 'w').write({rows!r})"]], 30, "rows"),
        ("toy", [[py, "-c", "import sys; print('boom'); sys.exit(3)"], [py, "-c", "print('never')"]], 30, "fails"),
        ("bench", [[py, "-c", "import time; time.sleep(30)"]], 1, "a step that hangs")])
    assert gpu.main(["--out", str(tmp_path)]) == 1, "a step that failed or timed out is a failure"
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| step | check | result | target | s |" in md, md
    assert "| tiles | a test step | 3 passed, 1 skipped in 0.50s | all pass |" in md, md
    assert "| decode | decode at batch 1 | 100 tok/s = 75% of the bound | >= 70% |" in md, md
    assert "|  | second row | x | - |  |" in md, md
    assert "| toy | fails | FAILED rc=3 (last: boom) | - |" in md and "never" not in (tmp_path / "toy.log").read_text()
    assert "| bench | a step that hangs | TIMEOUT" in md
    assert "a stand-in GPU" in md and "FAILED: toy, bench" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["bench.log", "benchmarks.md", "decode.log", "tiles.log", "toy.log",
                                            "train_metrics.jsonl"]
    assert gpu.main(["--out", str(tmp_path / "again"), "--only", "tiles"]) == 0
    assert sorted(os.listdir(tmp_path / "again")) == ["benchmarks.md", "tiles.log", "train_metrics.jsonl"]


def test_gpu_check_measurements_run_on_cpu_at_a_tiny_shape(tmp_path):
    """What the GPU steps run, made small: the synthetic toy inputs train with train.py, two runs
    compare, and the MFU, decode and kernel-target rows come out in the table's format."""
    import json
    from bench import gpu_checks
    import train
    toy = tmp_path / "toy"
    gpu_checks.main(["toy", str(toy)])
    for out in ("a", "b"):
        train.main(["--stage", "2", "--vision-tower", str(toy / "clip"), "--llm", str(toy / "llama"),
                    "--data", str(toy / "stage2.json"), "--image-folder", str(toy / "images"),
                    "--stage1-out", str(toy / "mm_projector.safetensors"), "--global-batch", "8",
                    "--micro-batch", "4", "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / out)])
    assert gpu_checks.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--rows", str(tmp_path / "c.json")]) == 0
    assert gpu_checks.main(["compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 1
    gpu_checks.main(["mfu", "--shape", "tiny", "--device", "cpu", "--seq", "24", "--micro-batch", "2", "--steps", "1",
                     "--rows", str(tmp_path / "mfu.json")])
    gpu_checks.main(["decode", "--shape", "tiny", "--device", "cpu", "--prompt", "4", "--new-tokens", "4",
                     "--rows", str(tmp_path / "decode.json")])
    bench = {"device": "NVIDIA H200", "dtype": "bf16", "rows": [
        {"kernel": "attention", "case": "CLIP ViT-L/336 tower", "pass": "fwd+bwd", "triton_ms": 2.0, "sdpa_ms": 1.8,
         "triton_tflops": 300.0, "speedup": 0.9},
        {"kernel": "rms_norm", "case": "LLaMA-7B hidden, 16k tokens", "pass": "fwd", "impl": "triton", "ms": 0.1,
         "gbps": 3840.0, "speedup": 1.0},
        {"kernel": "rms_norm", "case": "LLaMA-7B hidden, 16k tokens", "pass": "fwd", "impl": "nn.RMSNorm",
         "ms": 0.2, "gbps": 1920.0, "speedup": 2.0}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    gpu_checks.main(["kernels", str(tmp_path / "bench.json"), "--rows", str(tmp_path / "kernels.json")])
    rows = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("c", "mfu", "decode", "kernels")}
    assert all(len(r) == 3 and all(isinstance(x, str) for x in r) for rs in rows.values() for r in rs), rows
    assert "max relative loss difference 0.00% over 1 steps" in rows["c"][0][1]
    assert "tok/s" in rows["mfu"][0][1] and "tok/s" in rows["decode"][0][1]
    assert rows["kernels"] == [
        ["attention fwd+bwd, CLIP ViT-L/336 tower", "0.90x SDPA (2.00 vs 1.80 ms, 300 TFLOP/s)", ">= 1.0x"],
        ["RMSNorm fwd, LLaMA-7B hidden, 16k tokens", "3,840 GB/s = 80% of HBM, 2.00x nn.RMSNorm",
         ">= 70% of HBM, > 1.0x"]]
