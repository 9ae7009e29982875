"""End to end: the shortened toy pipeline (`pipeline.py --fast`) runs the whole LLaVA life cycle.

data_prep -> pretrain_toy -> eval -> train.py --stage 1 -> eval -> train.py --stage 2 -> eval ->
sample.py, with tiny step counts and 32 eval questions. Checks that every artefact exists and
loads (nanollava, and transformers for the HF-format pretrained parts) and that each loss falls.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    out, data = tmp / "out", tmp / "data"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "pipeline.py", "--fast", "--out", str(out), "--data", str(data),
                          "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"pipeline.py --fast failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out, data, res.stdout


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def test_fast_pipeline_writes_results_table(fast_run):
    out, _, stdout = fast_run
    report = (out / "results.md").read_text()
    for row in ("pretrained only (no visual training)", "after stage 1", "after stage 2", "**total**"):
        assert row in report, f"results.md lacks the row {row!r}:\n{report}"
    assert report in stdout, "the pipeline should print the table it writes"
    for name in ("pretrained", "stage1", "stage2"):
        answers = (out / f"answers_{name}.jsonl").read_text().splitlines()
        assert len(answers) == 32, f"answers_{name}.jsonl: expected 32 answers, found {len(answers)}"
    for stage in (1, 2):
        assert (out / f"stage{stage}" / "loss.png").stat().st_size > 0, f"stage {stage} drew no loss curve"


def test_fast_pipeline_every_loss_falls(fast_run):
    out, _, _ = fast_run
    for path in ("pretrain_vision.jsonl", "pretrain_text.jsonl", "stage1/metrics.jsonl", "stage2/metrics.jsonl"):
        curve = losses(out / path)
        assert len(curve) >= 4, f"{path}: only {len(curve)} logged steps"
        assert curve[-1] < curve[0], f"{path}: loss did not fall ({curve[0]:.3f} -> {curve[-1]:.3f}): {curve}"


def test_fast_pipeline_checkpoints_load_in_nanollava(fast_run):
    from nanollava import LLaVA
    from nanollava.checkpoint import load_from_parts, load_projector
    from nanollava.llava import num_image_tokens
    from nanollava.tokenizer import Tokenizer
    out, data, _ = fast_run
    tok = Tokenizer.from_file(str(out / "llama" / "tokenizer.json"))
    parts = load_from_parts(str(out / "clip"), str(out / "llama"), projector=str(out / "stage1"),
                                  image_token_id=tok.image_token_id)
    assert num_image_tokens(parts.config, (64, 64)) == 64
    assert set(load_projector(str(out / "stage1" / "mm_projector.bin"))) == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    model = LLaVA.from_pretrained(str(out / "stage2" / "final")).eval()
    ids = torch.tensor([[tok.bos_id] + [tok.image_token_id] * 64 + tok.encode("what shape is in the image?")])
    with torch.no_grad():
        logits = model(ids, pixel_values=torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_fast_pipeline_pretrained_parts_load_in_transformers(fast_run):
    transformers = pytest.importorskip("transformers")
    out, _, _ = fast_run
    for cls, name in ((transformers.CLIPVisionModel, "clip"), (transformers.LlamaForCausalLM, "llama")):
        _, info = cls.from_pretrained(str(out / name), output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers {cls.__name__} loading {name}: {bad}"
