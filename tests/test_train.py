"""train.py on a tiny LLaVA: freezing per stage, bit-for-bit resume, crash-safe checkpoints,
the llava-hf export, bad-input errors, the same run at 1, 2 and 3 ranks and micro-batches 2, 4
and 8 (with micro-batches that hold no image), --fsdp torch against --fsdp nano and resuming
each other's checkpoints, LoRA, bf16 on CPU, step timing and the MFU peak table.

The data is data_prep's toy restricted to a few easy-vqa images; the CLIP tower and the Llama
are tiny random transformers models saved in the HF layouts train.py reads.
"""
import json
import shutil
import os
import subprocess
import sys
from contextlib import nullcontext

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
    names = list(json.load(open(meta_dir / "meta.json"))["layout"]["weights"])
    assert names and all(n.startswith("multi_modal_projector.") for n in names), names
    assert sorted(os.listdir(stage1)) == ["ckpt", "loss.png", "metrics.jsonl", "mm_projector.bin",
                                          "mm_projector.safetensors", "train.lock"]
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
    real_save, calls = train.train_checkpoint.save_file, []

    def dying_save(tensors, path, metadata):   # the second checkpoint (step 3) dies mid-write
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise KeyboardInterrupt            # not an error nanollava handles: the process dies here
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train.train_checkpoint, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(args_for(parts, 2, crashed, *common))
    monkeypatch.setattr(train.train_checkpoint, "save_file", real_save)
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
    with pytest.raises(train.BadInput, match="stage-2 options"):
        train.main(args_for(parts, 1, tmp_path / "e", "--skip-stage1"))
    with pytest.raises(train.BadInput, match="needs --image-mode anyres"):
        train.main(args_for(parts, 2, tmp_path / "f", "--stage1-out", str(stage1), "--image-grid-pinpoints", "(1x1)"))
    # a checkpoint from before a run-config key existed reads as that key's default, not as a change
    old = tmp_path / "old"
    shutil.copytree(stage1, old, ignore=shutil.ignore_patterns("train.lock"))
    meta_path = old / "ckpt" / open(old / "ckpt" / "latest").read() / "meta.json"
    meta = json.load(open(meta_path))
    for key in ("projector_type", "image_grid_pinpoints", "image_pooling", "skip_stage1"):
        del meta["config"][key]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(train.BadInput, match=r"configuration \(lr: checkpoint 0.001 vs now 0.5\)$"):
        train.main(args_for(parts, 1, old, "--resume", "--lr", "0.5"))
    # from the command line: one readable line, no traceback
    r = subprocess.run([sys.executable, "train.py", *args_for(parts, 1, tmp_path / "d"), "--global-batch", "6",
                        "--micro-batch", "4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: --global-batch 6 is not divisible")
    assert "Traceback" not in r.stderr


# ---- scaling out: world size, micro-batch and FSDP engine leave the run unchanged -------------

INVARIANCE_BATCH, INVARIANCE_STEPS = 24, 3


def mixed_data(parts):
    """The toy's stage-2 records, every other one text-only (no image, no <image> tag), repeated
    to INVARIANCE_STEPS global batches and a half."""
    records = json.load(open(os.path.join(parts["data"], "stage2.json")))
    for rec in records[1::2]:
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    records = (records * 10)[:int((INVARIANCE_STEPS + 0.5) * INVARIANCE_BATCH)]
    path = parts["root"] / "mixed.json"
    path.write_text(json.dumps([dict(r, id=f"{r['id']}-{k}") for k, r in enumerate(records)]))
    return str(path), records


def invariance_args(parts, stage1, data, out, micro, *extra):
    """Stage 2 with every unit type sharded (the tower trained too), activation checkpointing,
    accumulation, and micro-batches that mix image and text-only samples (plain shuffle)."""
    return args_for(parts, 2, out, "--stage1-out", str(stage1), "--data", data, "--global-batch",
                    str(INVARIANCE_BATCH), "--micro-batch", str(micro), "--max-steps", str(INVARIANCE_STEPS),
                    "--lr", "1e-3", "--train-vision-tower", "--vision-lr", "1e-3", "--grad-checkpointing",
                    "--no-group-by-length", *extra)


def _train_ranks(rank, world, ports, runs):
    """A spawned rank: train.main for each run in turn, as torchrun would start it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        train.main(argv)


def spawn_training(world, runs):
    import torch.multiprocessing as mp
    from test_fsdp import free_port
    mp.spawn(_train_ranks, args=(world, [free_port() for _ in runs], runs), nprocs=world)


@pytest.fixture(scope="module")
def scaled_runs(parts, stage1):
    """The same stage-2 run at world sizes 1, 2, 3 and micro-batches 2, 4, 8 (global batch 24),
    under both FSDP engines, and 2-step runs that the other engine resumes for the last step."""
    data, _ = mixed_data(parts)
    root = parts["root"] / "scaled"
    out = {name: root / name for name in ("w1m8", "w1m2", "w2m4", "w2m4torch", "w3m2", "w3m8",
                                          "torch_then_nano", "nano_then_torch", "w2_then_w1")}
    for name, micro in (("w1m8", 8), ("w1m2", 2)):
        train.main(invariance_args(parts, stage1, data, out[name], micro))
    two = lambda name, *extra: invariance_args(parts, stage1, data, out[name], 4, *extra)  # noqa: E731
    spawn_training(2, [two("w2m4"), two("w2m4torch", "--fsdp", "torch"),
                       two("torch_then_nano", "--fsdp", "torch", "--max-steps", "2"),
                       two("torch_then_nano", "--fsdp", "nano", "--resume"),
                       two("nano_then_torch", "--fsdp", "nano", "--max-steps", "2"),
                       two("nano_then_torch", "--fsdp", "torch", "--resume"),
                       two("w2_then_w1", "--fsdp", "torch", "--max-steps", "2")])
    train.main(invariance_args(parts, stage1, data, out["w2_then_w1"], 8, "--resume"))       # 1 rank, micro 8
    spawn_training(3, [invariance_args(parts, stage1, data, out["w3m2"], 2),
                       invariance_args(parts, stage1, data, out["w3m8"], 8)])
    return out


def max_difference(a, b):
    """Max |a - b| over the per-step losses and every exported weight of two runs."""
    la = torch.tensor([json.loads(l)["loss"] for l in open(a / "metrics.jsonl")])
    lb = torch.tensor([json.loads(l)["loss"] for l in open(b / "metrics.jsonl")])
    assert len(la) == len(lb) == INVARIANCE_STEPS, (a, b)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return max([(la - lb).abs().max().item()] + [(wa[k] - wb[k]).abs().max().item() for k in wa])


def test_world_size_and_micro_batch_leave_training_unchanged(parts, scaled_runs, capsys):
    """1, 2 and 3 gloo ranks, micro-batches 2, 4 and 8, global batch 24: every step's loss and
    every final weight agree within 1e-5 (only the order of float sums differs), also for a run
    that 2 ranks start (--fsdp torch) and 1 rank resumes. Some micro-batches hold no image while
    another rank's does (every rank must still run the same collectives)."""
    _, records = mixed_data(parts)
    has_image = ["image" in r for r in records]
    steps = train.global_batches([1] * len(records), INVARIANCE_BATCH, train.DEFAULTS["seed"], 0, False)
    kinds = {tuple(any(has_image[i] for i in train.rank_micro_batches(b, 3, r, 2)[k]) for r in range(3))
             for b in steps for k in range(4)}
    assert any(True in k and False in k for k in kinds), f"no step mixes text-only and image micro-batches: {kinds}"
    diffs = {name: max_difference(scaled_runs["w1m8"], scaled_runs[name])
             for name in ("w1m2", "w2m4", "w3m2", "w3m8", "w2_then_w1")}
    with capsys.disabled():
        print(f"\nmax |difference| vs 1 rank x micro-batch 8: {diffs}")
    assert max(diffs.values()) <= 1e-5, diffs


def test_fsdp_torch_matches_nano_and_each_resumes_the_others_checkpoint(scaled_runs, capsys):
    """--fsdp torch (PyTorch's FSDP2) and --fsdp nano on 2 ranks: the same losses and weights; a
    torch checkpoint finishes under nano and a nano one under torch, as if never interrupted."""
    diffs = {name: max_difference(scaled_runs["w2m4"], scaled_runs[name])
             for name in ("w2m4torch", "torch_then_nano", "nano_then_torch")}
    with capsys.disabled():
        print(f"\nmax |difference| vs --fsdp nano on 2 ranks: {diffs}")
    assert max(diffs.values()) <= 1e-5, diffs
    meta = json.load(open(scaled_runs["torch_then_nano"] / "ckpt" / "step_0000003" / "meta.json"))
    assert meta["layout"]["world"] == 2 and len(os.listdir(scaled_runs["torch_then_nano"] / "ckpt")) == 3


def test_nano_shards_are_named_after_the_weights_they_hold_so_each_gets_its_groups_lr(parts):
    """After --fsdp nano wraps the model, its trainable parameters are flat shards; each one's name
    must put it in the parameter group (and lr) of its weights: the root holds all three groups."""
    import torch.distributed as dist
    from nanollava.checkpoint import load_from_parts
    from nanollava.fsdp import FSDP
    model = load_from_parts(parts["clip"], parts["llama"])
    units = list(model.language_model.model.layers) + list(model.vision_tower.vision_model.encoder.layers)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fsdp = FSDP(model, units, group_fn=train.param_group)
        shards = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        assert len(shards) == len(fsdp.flats) and {f.unit.name for f in fsdp.flats if not f.unit.name} == {""}
        assert {f.group for f in fsdp.flats if f.unit is fsdp.root} == {"llm", "projector", "vision_tower"}
        for f in fsdp.flats:
            assert train.param_group(shards[id(f.shard)]) == f.group, (shards[id(f.shard)], f.group, f.names[:3])
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_on_cpu_tracks_the_fp32_loss(parts, stage1, capsys):
    """--dtype bfloat16 (the GPU default) runs on CPU: autocast, bf16 gathered and frozen weights,
    fp32 masters and reductions, under both engines; its losses stay within bf16's precision of
    fp32's and the exported weights stay fp32."""
    common = ("--stage1-out", str(stage1), "--epochs", "4", "--lr", "1e-3", "--global-batch", "8",
              "--micro-batch", "4")
    curves = {}
    for dtype, fsdp in (("float32", "nano"), ("bfloat16", "nano"), ("bfloat16", "torch")):
        out = parts["root"] / f"{dtype}_{fsdp}"
        train.main(args_for(parts, 2, out, *common, "--dtype", dtype, "--fsdp", fsdp))
        curves[dtype, fsdp] = torch.tensor([json.loads(l)["loss"] for l in open(out / "metrics.jsonl")])
        final = load_file(out / "final" / "model.safetensors")
        assert {v.dtype for v in final.values()} == {torch.float32}
    fp32 = curves["float32", "nano"]
    with capsys.disabled():
        print(f"\nbf16 vs fp32 losses: {fp32.tolist()} vs {curves['bfloat16', 'nano'].tolist()} (nano), "
              f"{curves['bfloat16', 'torch'].tolist()} (torch)")
    assert not torch.equal(curves["bfloat16", "nano"], fp32), "--dtype bfloat16 changed nothing"
    for key in (("bfloat16", "nano"), ("bfloat16", "torch")):
        torch.testing.assert_close(curves[key], fp32, rtol=5e-3, atol=0, msg=f"{key} drifts from fp32")


# ---- LoRA ---------------------------------------------------------------------------------------

def test_lora_defaults_are_llava_1_5_finetune_lora():
    args = train.parse_args(["--stage", "2", "--lora"])
    assert (args.lora_r, args.lora_alpha, args.lr, args.projector_lr) == (128, 256, 2e-4, 2e-5)
    full = train.parse_args(["--stage", "2"])
    assert (full.lr, full.projector_lr) == (2e-5, None), "full fine-tuning: the projector follows --lr"


def test_lora_trains_adapters_and_projector_and_exports_a_merged_model_transformers_loads(parts, stage1):
    from transformers import LlavaForConditionalGeneration
    from nanollava import LLaVA
    from nanollava.checkpoint import load_from_parts
    from nanollava.lora import load_adapters
    from nanollava.tokenizer import Tokenizer
    common = ("--stage1-out", str(stage1), "--lora", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2",
              "--projector-lr", "1e-2", "--save-every", "1")
    out, resumed = parts["root"] / "lora", parts["root"] / "lora_resumed"
    train.main(args_for(parts, 2, out, *common, "--max-steps", "3"))
    names = json.load(open(out / "ckpt" / "step_0000003" / "meta.json"))["layout"]["weights"]
    assert names and all(".lora_" in n or n.startswith("multi_modal_projector.") for n in names), names
    assert sum(".lora_A" in n for n in names) == 2 * 7, "q k v o gate up down in each of the 2 blocks"

    # resume: the adapters and their AdamW state come back
    train.main(args_for(parts, 2, resumed, *common, "--max-steps", "2"))
    train.main(args_for(parts, 2, resumed, *common, "--max-steps", "3", "--resume"))
    a, b = load_file(out / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed LoRA run differs from the straight one"

    # the export is merged: base weights that LoRA wraps changed, the others did not
    llama = load_file(os.path.join(parts["llama"], "model.safetensors"))
    assert not torch.equal(a["language_model.model.layers.0.self_attn.q_proj.weight"],
                           llama["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(a["language_model.model.embed_tokens.weight"], llama["model.embed_tokens.weight"])
    assert not any("lora" in k for k in a)

    # merged export == base model + adapters, in nanollava and in transformers
    tok = Tokenizer.from_file(parts["tokenizer"])
    base = load_from_parts(parts["clip"], parts["llama"], image_token_id=tok.image_token_id)
    unmerged = load_adapters(base, str(out / "adapters.safetensors")).eval()
    merged = LLaVA.from_pretrained(str(out / "final")).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(str(out / "final")).eval()
    n_img = num_image_tokens(merged.config, (32, 32))
    ids = torch.tensor([[1] + [merged.config.image_token_id] * n_img + [7, 8, 9]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = merged(ids, pixel_values=pixels)
        torch.testing.assert_close(unmerged(ids, pixel_values=pixels), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ours, rtol=1e-4, atol=1e-4)


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


# ---- faults: nothing lost, nothing run, nothing miscounted ------------------------------------

def ckpt_steps(out):
    return sorted(d for d in os.listdir(out / "ckpt") if d.startswith("step_"))


def test_checkpoints_are_safetensors_and_keep_last_keeps_the_newest(parts, stage1, tmp_path):
    out = tmp_path / "keep"
    train.main(args_for(parts, 2, out, "--stage1-out", str(stage1), "--max-steps", "3", "--save-every", "1"))
    assert ckpt_steps(out) == ["step_0000002", "step_0000003"], "--keep-last 2 by default"
    files = {f for d in ckpt_steps(out) for f in os.listdir(out / "ckpt" / d)}
    assert files == {"meta.json", "rank0.safetensors"}, "training state holds no pickle"
    assert not [f for f in os.listdir(out / "ckpt") if f.endswith((".tmp", ".partial"))]


def plant_pickle(path, marker):
    """A file whose unpickling runs `touch marker`."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model": Payload()}, path)


def test_resume_never_unpickles_a_planted_checkpoint(parts, stage1, tmp_path):
    out, marker = tmp_path / "planted", tmp_path / "PAYLOAD_RAN"
    common = ("--stage1-out", str(stage1), "--max-steps", "1")
    train.main(args_for(parts, 2, out, *common))
    latest = out / "ckpt" / "step_0000001"
    # an old-style rank0.pt in place of the safetensors file: refused, unread
    (latest / "rank0.safetensors").rename(tmp_path / "good.safetensors")
    plant_pickle(latest / "rank0.pt", marker)
    with pytest.raises(train.BadInput, match=r"rank0.pt is a pickle file, which nanollava never loads"):
        train.main(args_for(parts, 2, out, *common, "--resume", "--max-steps", "2"))
    # the payload under the expected name: not a safetensors file, refused
    os.replace(latest / "rank0.pt", latest / "rank0.safetensors")
    with pytest.raises(train.BadInput, match=r"rank0.safetensors is damaged or not a nanollava checkpoint"):
        train.main(args_for(parts, 2, out, *common, "--resume", "--max-steps", "2"))
    assert not marker.exists(), "the planted payload ran"
    # tampered tensors (a shard cut short) in an otherwise valid file: refused with the file named
    from safetensors.torch import load_file as load_st, save_file
    good = load_st(tmp_path / "good.safetensors")
    meta = __import__("safetensors").safe_open(str(tmp_path / "good.safetensors"), "pt").metadata()
    key = next(k for k in good if k.startswith("model."))
    save_file(dict(good, **{key: good[key][:-1].clone()}), latest / "rank0.safetensors", metadata=meta)
    with pytest.raises(train.BadInput, match=r"rank0.safetensors does not fit this run"):
        train.main(args_for(parts, 2, out, *common, "--resume", "--max-steps", "2"))


def test_damaged_latest_checkpoint_falls_back_or_names_the_file(parts, stage1, tmp_path, capsys):
    out = tmp_path / "damaged"
    common = ("--stage1-out", str(stage1), "--save-every", "1")
    train.main(args_for(parts, 2, out, *common, "--max-steps", "2"))     # --keep-last 2: steps 1 and 2
    rank0 = out / "ckpt" / "step_0000002" / "rank0.safetensors"
    rank0.write_bytes(rank0.read_bytes()[:1000])                          # truncated
    train.main(args_for(parts, 2, out, *common, "--max-steps", "3", "--resume"))
    err = capsys.readouterr().err
    assert f"{rank0} is damaged" in err and "falling back to" in err and "step_0000001" in err
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2, 3], "step 2 redone once"
    # a bad meta.json and nothing older to fall back on: one message naming the file
    only = tmp_path / "only"
    train.main(args_for(parts, 2, only, *common, "--max-steps", "1"))
    meta = only / "ckpt" / "step_0000001" / "meta.json"
    meta.write_text('{"step": 1, "data": ')
    with pytest.raises(train.BadInput, match=rf"{meta}: not valid JSON .*no older complete checkpoint"):
        train.main(args_for(parts, 2, only, *common, "--max-steps", "2", "--resume"))


def test_full_disk_during_a_checkpoint_is_a_clear_error_and_leaves_no_tmp(parts, stage1, tmp_path, monkeypatch):
    out = tmp_path / "full"
    common = ("--stage1-out", str(stage1), "--save-every", "1", "--max-steps", "2")
    real_save = train.train_checkpoint.save_file

    def full_disk(tensors, path, metadata):       # what safetensors raises when the disk fills up
        if "step_0000002" in str(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)
            from safetensors import SafetensorError
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train.train_checkpoint, "save_file", full_disk)
    with pytest.raises(train.files.WriteError, match=r"cannot write .*step_0000002.partial/rank0.safetensors: "
                                                     r".*No space left on device"):
        train.main(args_for(parts, 2, out, *common))
    monkeypatch.undo()
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert leftovers == []
    assert open(out / "ckpt" / "latest").read() == "step_0000001"
    train.main(args_for(parts, 2, out, *common, "--resume"))             # step 1 intact: resumes
    assert open(out / "ckpt" / "latest").read() == "step_0000002"


def test_torn_metrics_line_is_dropped_on_resume(parts, stage1, tmp_path):
    out = tmp_path / "torn"
    common = ("--stage1-out", str(stage1), "--save-every", "1")
    train.main(args_for(parts, 2, out, *common, "--max-steps", "2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')                                # the disk filled up mid-line
    train.main(args_for(parts, 2, out, *common, "--max-steps", "3", "--resume"))
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_second_run_on_the_same_out_is_refused(parts, stage1, tmp_path):
    out = tmp_path / "busy"
    with train.files.locked(str(out)):                                   # a run in progress
        with pytest.raises(train.files.Busy, match=rf"{out} is in use by another run \(pid {os.getpid()}"):
            train.main(args_for(parts, 2, out, "--stage1-out", str(stage1), "--max-steps", "1"))
    assert not os.path.exists(out / "metrics.jsonl"), "the refused run wrote nothing"
    train.main(args_for(parts, 2, out, "--stage1-out", str(stage1), "--max-steps", "1"))   # free again


def write_records(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def test_unusable_records_are_skipped_counted_and_logged(parts, stage1, tmp_path):
    """A lone surrogate in the text, a 30000x1 image: skipped with a warning, counted in metrics
    (with and without DataLoader workers); a literal "</s>" in the text stays text."""
    from PIL import Image
    records = json.load(open(os.path.join(parts["data"], "stage2.json")))
    images = os.path.join(parts["data"], "images")
    Image.new("L", (30000, 1)).save(os.path.join(images, "thin.png"))
    bad = [dict(records[0], id="surrogate", conversations=[dict(records[0]["conversations"][0]),
                                                           {"from": "gpt", "value": "red \udcff"}]),
           dict(records[1], id="thin", image="thin.png"),
           dict(records[2], id="eos", conversations=[dict(records[2]["conversations"][0]),
                                                     {"from": "gpt", "value": "a </s> b <s> <pad>"}])]
    data = write_records(tmp_path / "bad.json", bad + records)
    for workers in ("0", "1"):                   # a worker's warnings stay in the worker; its counts do not
        out = tmp_path / f"skips{workers}"
        with pytest.warns(UserWarning, match="skipping record") if workers == "0" else nullcontext():
            train.main(args_for(parts, 2, out, "--stage1-out", str(stage1), "--data", data, "--max-steps", "3",
                                "--num-workers", workers, "--no-group-by-length"))
        last = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
        assert last["skipped"] >= 1 and set(last["skipped_by_kind"]) <= {"ValueError"}, last


def test_wrong_image_folder_and_deep_json_are_one_line_errors(parts, stage1, tmp_path):
    wrong = tmp_path / "empty_folder"
    wrong.mkdir()
    with pytest.raises(train.BadInput, match=r"none of the first \d+ images .* is in the image folder .*"
                                             r"is --image-folder right\?"):
        train.main(args_for(parts, 1, tmp_path / "a") + ["--image-folder", str(wrong), "--max-steps", "1"])
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(train.BadInput, match=r"deep.json: JSON nested too deeply"):
        train.main(args_for(parts, 1, tmp_path / "b") + ["--data", str(deep), "--max-steps", "1"])
    # the folder is right, but nearly every image is gone: a DataLoader worker gives up, in one line
    good = json.load(open(os.path.join(parts["data"], "stage1.json")))[0]
    gone = write_records(tmp_path / "gone.json", [good] + [dict(good, image="gone.png")] * 400)
    with pytest.raises(train.BadInput, match=r"^\S*gone.json: no usable record in 64 in a row .*gone.png\); "
                                             r"data_prep.py lists every bad record$"):
        train.main(args_for(parts, 1, tmp_path / "c") + ["--data", gone, "--num-workers", "1", "--max-steps", "1"])


@pytest.mark.parametrize("flag, value, message", [
    ("--micro-batch", "0", "0 is not a positive integer"),
    ("--keep-last", "0", "0 is not a positive integer"),
    ("--lr", "-1", "-1 is not a positive number"),
    ("--warmup-ratio", "1.5", "1.5 is not a number in"),
    ("--dist-timeout", "nan", "nan is not a positive number"),
    ("--num-workers", "many", "'many' is not an integer >= 0"),
])
def test_bad_numbers_are_one_argparse_line(parts, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        train.main(args_for(parts, 1, tmp_path / "x") + [flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def wait_for(condition, timeout=120, what="condition"):
    import time
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def steps_logged(out):
    try:
        return sum(1 for line in open(out / "metrics.jsonl") if line.endswith("\n"))
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("sig, workers", [("SIGINT", "1"), ("SIGTERM", "0")])
def test_signal_checkpoints_and_resume_is_bit_for_bit(parts, stage1, sig, workers):
    """A real Ctrl-C (to the whole process group, DataLoader worker included) or SIGTERM with the
    default --save-every 0: the step finishes, a checkpoint is written, the exit is non-zero with
    one line that says how to resume, and the resumed run equals an uninterrupted one."""
    import signal
    common = ("--stage1-out", str(stage1), "--epochs", "100", "--num-workers", workers)
    out = parts["root"] / f"signal_{sig}"
    proc = subprocess.Popen([sys.executable, "train.py", *args_for(parts, 2, out, *common)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: steps_logged(out) >= 1 or proc.poll() is not None, what="the first step")
    os.killpg(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {sig} at step ") and "rerun the same command with --resume" in last, last
    k = int(open(out / "ckpt" / "latest").read().removeprefix("step_"))
    assert steps_logged(out) == k and f"step_{k:07d}" in last

    train.main(args_for(parts, 2, out, *common, "--resume", "--max-steps", str(k + 1)))
    straight = parts["root"] / f"straight_{sig}"
    train.main(args_for(parts, 2, straight, *common, "--max-steps", str(k + 1)))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), f"interrupted + resumed differs from uninterrupted at {key}"


def torchrun(parts, out, log, *flags):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *args_for(parts, 2, out, *flags)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def children(pid):
    """{pid: RANK} of the processes whose parent is `pid` (the torchrun workers)."""
    out = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{p}/stat").read()
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out[int(p)] = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
    return out


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_checkpoint_and_exit_when_the_launcher_dies(parts, stage1, tmp_path):
    out = tmp_path / "orphans"
    with open(tmp_path / "log", "w") as log:
        launcher = torchrun(parts, out, log, "--stage1-out", str(stage1), "--epochs", "100", "--micro-batch", "1")
        wait_for(lambda: steps_logged(out) >= 1 or launcher.poll() is not None, what="the first step")
        ranks = children(launcher.pid)
        assert sorted(ranks.values()) == [0, 1], ranks
        launcher.kill()                                                   # kill -9: no chance to clean up
        launcher.wait()
        wait_for(lambda: not any(alive(p) for p in ranks), timeout=60, what="the orphaned workers to exit")
    assert os.path.isfile(out / "ckpt" / "latest"), open(tmp_path / "log").read()[-3000:]


def test_a_stopped_rank_fails_the_run_after_dist_timeout(parts, stage1, tmp_path):
    import signal
    import time
    out = tmp_path / "stuck"
    with open(tmp_path / "log", "w") as log:
        launcher = torchrun(parts, out, log, "--stage1-out", str(stage1), "--epochs", "100", "--micro-batch", "1",
                            "--dist-timeout", "3")
        wait_for(lambda: steps_logged(out) >= 1 or launcher.poll() is not None, what="the first step")
        ranks = {r: p for p, r in children(launcher.pid).items()}
        os.kill(ranks[1], signal.SIGSTOP)                                 # rank 1 hangs
        t0 = time.time()
        wait_for(lambda: not alive(ranks[0]), timeout=90, what="rank 0 to give up")
        waited = time.time() - t0
        os.kill(ranks[1], signal.SIGKILL)
        launcher.wait(timeout=120)
    text = open(tmp_path / "log").read()
    assert launcher.returncode != 0 and waited < 30, (waited, text[-3000:])
    assert "Timed out" in text or "timed out" in text, text[-3000:]
