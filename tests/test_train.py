"""train.py on a tiny LLaVA: freezing per stage, bit-for-bit resume, crash-safe checkpoints,
the llava-hf export, bad-input errors, FSDP parity between 1 and 2 torchrun ranks (with
micro-batches that hold no image), step timing and the MFU peak table.

The data is data_prep's toy restricted to a few easy-vqa images; the CLIP tower and the Llama
are tiny random transformers models saved in the HF layouts train.py reads.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                       # train.py and data_prep.py live at the repo root

import train  # noqa: E402
from nanollava.checkpoint import load_projector  # noqa: E402
from nanollava.llava import num_image_tokens  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny toy data (8 images per split) + tiny CLIP and Llama HF directories."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("easy_vqa", reason="the toy data is built from easy-vqa (pip install easy-vqa)")
    import data_prep
    from nanollava.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("train")
    data = str(root / "data")
    data_prep.build_toy(data, limit=8)
    tok = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, hidden_act="quick_gelu")).save_pretrained(root / "clip")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id)).save_pretrained(root / "llama")
    return dict(root=root, data=data, clip=str(root / "clip"), llama=str(root / "llama"),
                tokenizer=os.path.join(data, "tokenizer.json"))


def args_for(parts, stage, out, *extra):
    return ["--stage", str(stage), "--vision-tower", parts["clip"], "--llm", parts["llama"],
            "--tokenizer", parts["tokenizer"], "--data", os.path.join(parts["data"], f"stage{stage}.json"),
            "--image-folder", os.path.join(parts["data"], "images"), "--out", str(out),
            "--global-batch", "4", "--micro-batch", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def stage1(parts):
    out = parts["root"] / "stage1"
    train.main(args_for(parts, 1, out, "--max-steps", "2"))
    return out


def test_stage1_trains_only_the_projector_and_saves_it_alone(parts, stage1):
    meta_dir = stage1 / "ckpt" / open(stage1 / "ckpt" / "latest").read()
    layout = json.load(open(meta_dir / "meta.json"))["layout"]
    names = [n for f in layout["flats"] for n in f["names"]]
    assert names and all(n.startswith("multi_modal_projector.") for n in names), names
    assert sorted(os.listdir(stage1)) == ["ckpt", "loss.png", "metrics.jsonl", "mm_projector.bin",
                                          "mm_projector.safetensors"]
    original = torch.load(stage1 / "mm_projector.bin", weights_only=True)
    assert sorted(original) == [f"model.mm_projector.{i}.{k}" for i in (0, 2) for k in ("bias", "weight")]
    ours, theirs = load_projector(str(stage1 / "mm_projector.safetensors")), load_projector(str(stage1 / "mm_projector.bin"))
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    steps = [json.loads(l) for l in open(stage1 / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1, 2] and all({"loss", "lr", "tokens_per_s"} <= set(s) for s in steps)


def tower(state):
    return {k: v for k, v in state.items() if k.startswith("vision_tower.")}


def test_stage2_freezes_the_tower_unless_asked_and_export_matches_transformers(parts, stage1):
    out = parts["root"] / "stage2"
    train.main(args_for(parts, 2, out, "--stage1-out", str(stage1), "--max-steps", "1", "--lr", "1e-3"))
    final = load_file(out / "final" / "model.safetensors")
    clip = {k if k.startswith("vision_model.") else "vision_model." + k: v    # transformers 5 drops the prefix
            for k, v in load_file(os.path.join(parts["clip"], "model.safetensors")).items()}
    assert len(clip) == len(tower(final)), "every tower weight is exported"
    llama = load_file(os.path.join(parts["llama"], "model.safetensors"))
    for k, v in clip.items():
        assert torch.equal(final["vision_tower." + k], v), f"frozen tower weight {k} changed in stage 2"
    assert not torch.equal(final["language_model.model.layers.0.mlp.up_proj.weight"],
                           llama["model.layers.0.mlp.up_proj.weight"]), "stage 2 must train the LLM"

    # the export is a llava-hf checkpoint: transformers loads it and computes the same logits
    from transformers import LlavaForConditionalGeneration
    from nanollava import LLaVA
    ours = LLaVA.from_pretrained(str(out / "final")).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(str(out / "final")).eval()
    n_img = num_image_tokens(ours.config, (32, 32))
    ids = torch.tensor([[1] + [ours.config.image_token_id] * n_img + [7, 8, 9]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels),
                                   rtol=1e-4, atol=1e-4)

    out_v = parts["root"] / "stage2_tower"
    train.main(args_for(parts, 2, out_v, "--stage1-out", str(stage1), "--max-steps", "1",
                        "--train-vision-tower", "--vision-lr", "1e-2"))
    tuned = load_file(out_v / "final" / "model.safetensors")
    assert not torch.equal(tuned["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
                           clip["vision_model.encoder.layers.0.mlp.fc1.weight"]), "--train-vision-tower had no effect"


def test_resume_after_an_interrupted_checkpoint_is_bit_for_bit(parts, stage1, monkeypatch):
    common = ("--stage1-out", str(stage1), "--schedule-steps", "6", "--save-every", "2", "--grad-checkpointing",
              "--max-steps", "3")
    straight = parts["root"] / "straight"
    train.main(args_for(parts, 2, straight, *common))

    crashed = parts["root"] / "crashed"
    real_save, calls = train._atomic_save, []

    def dying_save(obj, path):                 # the second checkpoint (step 3) dies mid-write
        calls.append(path)
        if len(calls) == 2:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half a checkpoint")
            raise RuntimeError("killed while writing")
        real_save(obj, path)

    monkeypatch.setattr(train, "_atomic_save", dying_save)
    with pytest.raises(RuntimeError, match="killed while writing"):
        train.main(args_for(parts, 2, crashed, *common))
    monkeypatch.setattr(train, "_atomic_save", real_save)
    assert open(crashed / "ckpt" / "latest").read() == "step_0000002", "the previous checkpoint must stay current"

    train.main(args_for(parts, 2, crashed, *common, "--resume"))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(crashed / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs from the uninterrupted one at {k}"
    la = [json.loads(l)["loss"] for l in open(straight / "metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(crashed / "metrics.jsonl")]
    assert la == lb and len(la) == 3


def test_bad_inputs_fail_before_any_work(parts, stage1, tmp_path):
    with pytest.raises(train.BadInput, match="stage-1 projector"):
        train.main(args_for(parts, 2, tmp_path / "a", "--stage1-out", str(tmp_path / "nowhere")))
    with pytest.raises(train.BadInput, match="data file not found"):
        train.main(args_for(parts, 1, tmp_path / "b") + ["--data", str(tmp_path / "missing.json")])
    with pytest.raises(train.BadInput, match="not divisible"):
        train.main(args_for(parts, 1, tmp_path / "c") + ["--global-batch", "6", "--micro-batch", "4"])
    with pytest.raises(train.BadInput, match="lr: checkpoint 0.001 vs now 0.5"):
        train.main(args_for(parts, 1, stage1, "--resume", "--lr", "0.5"))
    # from the command line: one readable line, no traceback
    r = subprocess.run([sys.executable, "train.py", *args_for(parts, 1, tmp_path / "d"), "--global-batch", "6",
                        "--micro-batch", "4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: --global-batch 6 is not divisible")
    assert "Traceback" not in r.stderr


def test_fsdp_two_ranks_match_one_rank_with_text_only_micro_batches(parts, stage1):
    """torchrun --nproc_per_node 2 vs 1 process on data where every other sample has no image:
    the same samples per step (micro-batch 1, plain shuffle) give the same losses and weights,
    also when one rank's micro-batch is text-only while the other's has an image (every rank must
    issue the same collectives). The vision tower is trained too so every unit type is sharded."""
    from nanollava.data import LengthGroupedSampler
    records = json.load(open(os.path.join(parts["data"], "stage2.json")))
    for rec in records[1::2]:                                  # text-only: no image, no <image> tag
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    data = parts["root"] / "mixed.json"
    data.write_text(json.dumps(records))
    steps = 3
    # the pairs (rank 0, rank 1) of micro-batches the 2-rank run sees: at least one mixes a
    # text-only sample with an image sample, in each direction
    order = [LengthGroupedSampler([1] * len(records), 1, 2, r, seed=train.seed, group_by_length=False).indices()
             for r in range(2)]
    pairs = [tuple("image" in records[order[r][i]] for r in range(2)) for i in range(2 * steps)]
    assert (True, False) in pairs and (False, True) in pairs, f"the sampler no longer mixes them: {pairs}"

    flags = ("--stage1-out", str(stage1), "--max-steps", str(steps), "--micro-batch", "1", "--lr", "1e-3",
             "--train-vision-tower", "--vision-lr", "1e-3", "--grad-checkpointing", "--no-group-by-length",
             "--data", str(data))
    one, two = parts["root"] / "one", parts["root"] / "two"
    train.main(args_for(parts, 2, one, *flags))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *args_for(parts, 2, two, *flags)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    la = [json.loads(l)["loss"] for l in open(one / "metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(two / "metrics.jsonl")]
    assert len(la) == steps
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=f"{k}: 2 ranks differ from 1")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", None)])
def test_mfu_peak_is_the_dense_bf16_peak_of_that_gpu(name, peak):
    assert train.peak_flops(name) == peak


def test_step_time_waits_for_the_gpu_before_reading_the_clock(monkeypatch):
    """CUDA work is queued: a step's dt must include what is still running at its end."""
    import time
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (calls.append(device), time.sleep(0.05)))
    t0 = time.time()
    assert train.elapsed(t0, torch.device("cuda", 0)) >= 0.05 and calls == [torch.device("cuda", 0)]
    assert train.elapsed(time.time(), torch.device("cpu")) < 0.05 and len(calls) == 1
