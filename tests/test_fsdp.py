"""Hand-rolled FSDP (nanollava/fsdp.py: FSDP, and PrefetchFSDP on top) against plain
single-process training.

1, 2 and 3 gloo ranks train a small decoder-like model whose parameter counts are not
divisible by the world size; the losses and final weights must match ordinary training with
the same global batch, per-rank param+grad+optimizer bytes must be ~1/world of the total,
frozen blocks must carry no optimizer state, and the ranks' checkpoint pieces must tile every
trainable weight. Activation checkpointing (reentrant and non-reentrant) and gradient
accumulation must not change the result.

A toy vision-language model checks what depends on the data (docs/gpu.md): a rank whose
micro-batch has no image (the projector gets no gradient there) and a first micro-batch that
skips the tower (the recorded unit order then prefetches a block after its backward). On a
GPU, 2 gloo ranks share it to run the CUDA side-stream path, which NCCL cannot do on one GPU.
"""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanollava.fsdp import FSDP, PrefetchFSDP
from train import clip_grad_norm_, local_bytes

VOCAB, DIM, HIDDEN, N_BLOCKS, T = 37, 11, 29, 3, 5
GLOBAL_BATCH, STEPS, LRS = 6, 3, {"embed": 3e-2, "blocks": 1e-2}


class Block(nn.Module):
    """A pre-norm residual MLP block: 689 parameters, divisible by neither 2 nor 3."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM, bias=False)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.head = nn.Linear(DIM, VOCAB)
        self.checkpointing = None        # None | "reentrant" | "non_reentrant"

    def forward(self, ids, targets):                            # the loss: FSDP's root hook is on forward
        h = self.embed(ids)                                     # (B, T, C)
        for block in self.blocks:
            if self.checkpointing and self.training:
                h = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
            else:
                h = block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


def make_model():
    torch.manual_seed(0)
    model = Toy()
    for p in model.blocks[0].parameters():                      # a frozen unit
        p.requires_grad_(False)
    return model


def group_fn(name):
    return "blocks" if name.startswith("blocks") else "embed"


def batches(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (GLOBAL_BATCH, T), generator=g).to(device),
             torch.randint(0, VOCAB, (GLOBAL_BATCH, T), generator=g).to(device)) for _ in range(STEPS)]


def reference(device="cpu"):
    """Plain training: full batch, torch AdamW, torch's global-norm clipping."""
    model = make_model().to(device)
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_fn(name), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": LRS[g]} for g, ps in groups.items()],
                            betas=(0.9, 0.999), weight_decay=0.0)
    losses = []
    for ids, targets in batches(device):
        loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = model(*batches(device)[0]).item()
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, eval_loss


def optimizer_of(model, lrs, group):
    """AdamW over the model's trainable parameters: after FSDP, its flat shards."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group(name), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lrs[g]} for g, ps in groups.items()],
                             betas=(0.9, 0.999), weight_decay=0.0)


def run_fsdp(rank, world, cls, checkpointing, micro_batches, device="cpu"):
    """The same training, sharded: each rank takes its slice of the global batch (fp32 weights
    on every device, so that CUDA must match plain training as closely as the CPU does)."""
    model = make_model()
    model.checkpointing = checkpointing
    fsdp = cls(model, units=list(model.blocks), group_fn=group_fn, device=device)
    assert cls is FSDP or (fsdp.ag_stream is not None) == (device == "cuda")
    opt = optimizer_of(model, LRS, group_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(f.shard) for f in fsdp.flats}, "the shards are the trainable parameters"
    per_rank = GLOBAL_BATCH // world
    micro = per_rank // micro_batches
    losses = []
    for ids, targets in batches(device):
        ids, targets = ids[rank * per_rank:(rank + 1) * per_rank], targets[rank * per_rank:(rank + 1) * per_rank]
        total = torch.zeros((), device=device)
        for m in range(micro_batches):
            sl = slice(m * micro, (m + 1) * micro)
            loss = model(ids[sl], targets[sl]) / micro_batches
            loss.backward()
            total += loss.detach()
        fsdp.reduce_grads()
        clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        losses.append(total.item() / world)
    # evaluation forward under no_grad must work too (views of gathered-then-freed buffers)
    model.eval()
    with torch.no_grad():
        eval_loss = model(*batches(device)[0]).item()
    return {"losses": losses, "state": fsdp.full_state_dict(), "kept": fsdp.full_state_dict(keep=False),
            "bytes": local_bytes(params, opt),
            "eval_loss": eval_loss, "n_opt_params": sum(len(g["params"]) for g in opt.param_groups),
            "n_opt_state": len(opt.state), "flat_units": sorted({f.unit.name for f in fsdp.flats}),
            "trainable": sorted(n for f in fsdp.flats for n in f.names),
            "pieces": [(name, start, shard[lo:hi].detach().cpu().clone())
                       for name, _, start, shard, lo, hi in fsdp.pieces()]}


# (engine, checkpointing, micro-batches)
SCENARIOS = [(FSDP, None, 1), (FSDP, "non_reentrant", 1), (FSDP, "reentrant", 1), (FSDP, None, 3),
             (PrefetchFSDP, None, 3), (PrefetchFSDP, "non_reentrant", 1)]


def init(rank, world, port):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    else:                                                      # one rank is a process group too
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _worker(rank, world, port, out_dir, device="cpu"):
    init(rank, world, port)
    torch.set_num_threads(1)
    results = {}
    for cls, ckpt, micro in SCENARIOS:
        if (GLOBAL_BATCH // world) % micro or (world == 3 and ckpt == "reentrant"):   # keep 3 ranks quick
            continue
        results[(cls.__name__, ckpt, micro)] = run_fsdp(rank, world, cls, ckpt, micro, device)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ref():
    return reference()


def _check_against_reference(world, ref, device="cpu"):
    ref_losses, ref_state, ref_eval = ref
    with tempfile.TemporaryDirectory() as out_dir:
        if world == 1:
            _worker(0, 1, None, out_dir, device)
        else:
            mp.spawn(_worker, args=(world, free_port(), out_dir, device), nprocs=world)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    total_trainable = sum(v.numel() for k, v in ref_state.items() if not k.startswith("blocks.0."))
    embed_numel = VOCAB * DIM + DIM * VOCAB + VOCAB                  # the root unit's flat
    assert all(n % 2 and n % 3 for n in (embed_numel, 689)), "flat sizes must not divide evenly"
    for scenario in results[0]:
        for rank, res in enumerate(results):
            r = res[scenario]
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses),
                                       rtol=1e-5, atol=1e-6, msg=f"losses differ: {scenario} rank {rank}")
            for k, v in ref_state.items():
                torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6,
                                           msg=f"{k} differs after training: {scenario} rank {rank}")
            assert abs(r["eval_loss"] - ref_eval) < 1e-5, f"no_grad forward differs: {scenario}"
            assert r["kept"] == {}, "keep=False joins the gathers and holds no copy"
            # the ranks' checkpoint pieces tile every trainable weight exactly
            for k in r["trainable"]:
                got = torch.full((r["state"][k].numel(),), float("nan"))
                for res_r in results:
                    for name, start, piece in res_r[scenario]["pieces"]:
                        if name == k:
                            assert got[start:start + len(piece)].isnan().all(), f"{k}: pieces overlap"
                            got[start:start + len(piece)] = piece
                assert torch.equal(got.view_as(r["state"][k]), r["state"][k]), f"{k}: pieces do not tile it"
            # the frozen block is not sharded and has no optimizer state
            assert "blocks.0" not in r["flat_units"]
            assert not any(n.startswith("blocks.0.") for n in r["trainable"])
            assert r["n_opt_state"] == r["n_opt_params"]
            # master shard + AdamW exp_avg + exp_avg_sq (grads are freed) = 3 fp32 copies of 1/world
            ideal = 3 * 4 * total_trainable / world
            padding = 3 * 4 * len(r["flat_units"]) * 2 * world   # < world elements per flat
            assert ideal <= r["bytes"] <= ideal + padding, (
                f"rank {rank} holds {r['bytes']} bytes, expected ~{ideal:.0f} (1/{world} of the total)")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp_matches_single_process_training(world, ref):
    _check_against_reference(world, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the side-stream path only runs on CUDA")
def test_fsdp_cuda_side_streams_match_plain_training_with_two_gloo_ranks_on_one_gpu():
    """Prefetch on ag_stream, reduce-scatter on rs_stream, events, record_stream and storage
    resizes: 2 gloo ranks share cuda:0 (NCCL refuses two ranks on one GPU) and must match plain
    training on the same GPU, with checkpointing and accumulation too."""
    _check_against_reference(2, reference("cuda"), "cuda")


def test_flat_views_backward_is_one_split_not_a_zero_buffer_per_weight():
    """Every weight of a flat hangs off ONE SplitWithSizesBackward node (backward = one cat),
    none off a SliceBackward (backward = a zero buffer the size of the whole flat, per weight)."""
    init(0, 1, None)
    try:
        model = make_model()
        fsdp = FSDP(model, units=list(model.blocks), group_fn=group_fn)
        seen = []
        for flat in fsdp.flats:                       # look at the views while the unit runs
            flat.unit.module.register_forward_hook(lambda m, a, out, f=flat: seen.append(
                (f.names, {type(getattr(mod, attr).grad_fn.next_functions[0][0]).__name__
                           for slots in f.slots for mod, attr in slots},
                 {id(getattr(mod, attr).grad_fn.next_functions[0][0]) for slots in f.slots for mod, attr in slots})),
                prepend=True)
        model(*batches()[0]).backward()
        fsdp.reduce_grads()
        assert len(seen) == len(fsdp.flats)
        for names, parents, nodes in seen:
            assert parents == {"SplitWithSizesBackward0"} and len(nodes) == 1, (names, parents)
        assert all(f.shard.grad is not None for f in fsdp.flats)
    finally:
        dist.destroy_process_group()


def test_the_root_is_gathered_once_per_step_not_per_micro_batch():
    """The micro-batches of a step share the root's gathered weights; after the step's
    reduce_grads() and optimizer.step() the next forward gathers the new ones."""
    init(0, 1, None)
    try:
        model = make_model()
        fsdp = FSDP(model, units=list(model.blocks), group_fn=group_fn)
        opt = optimizer_of(model, LRS, group_fn)
        gathers = []
        for flat in fsdp.root.flats:
            flat.gather = lambda f=flat, g=flat.gather: (gathers.append(f.group), g())
        ids, targets = batches()[0]
        for step in range(2):
            for m in range(3):                                   # 3 micro-batches
                model(ids[m::3], targets[m::3]).backward()
            assert len(gathers) == (step + 1) * len(fsdp.root.flats)
            fsdp.reduce_grads()
            opt.step()
            opt.zero_grad(set_to_none=True)
        flat = fsdp.root.flats[0]
        model(ids, targets)                                      # the weights the last step wrote
        assert torch.equal(flat.flat.detach().float(), torch.cat([flat.shard.detach()]))
    finally:
        dist.destroy_process_group()


# ---- data-dependent paths: text-only micro-batches, a first forward that skips the tower ----

class ToyVLM(nn.Module):
    """Toy with LLaVA's shape: an image goes through tower blocks (units) and a projector (root)
    into the token embeddings; a micro-batch without an image skips both, as LLaVA.embed does."""

    def __init__(self, train_tower):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.tower = nn.ModuleList(Block() for _ in range(2))
        self.projector = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.head = nn.Linear(DIM, VOCAB)
        self.tower.requires_grad_(train_tower)

    def forward(self, ids, targets, image=None):
        h = self.embed(ids)                                     # (B, T, C)
        if image is not None:                                   # (B, C)
            for block in self.tower:
                image = block(image)
            h = h + self.projector(image)[:, None]
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


VLM_LRS = {"llm": 3e-2, "projector": 3e-2, "tower": 3e-2}
# which (rank, micro-batch) has an image, per scenario; every step uses the same pattern
VLM_SCENARIOS = {
    # rank 1 never has an image: its projector flat gets no gradient (tower frozen, so the
    # forward passes of both ranks still run the same units)
    "text-only rank": dict(train_tower=False, has_image=lambda rank, m: rank == 0),
    # every rank's first micro-batch is text-only: the first forward records the blocks before
    # the tower, so the tower's backward prefetches the last block after that block's backward
    "text-only first micro-batch": dict(train_tower=True, has_image=lambda rank, m: m == 1),
}
VLM_WORLD, VLM_MICRO, VLM_STEPS = 2, 2, 3


def vlm_group(name):
    return "tower" if name.startswith("tower") else "projector" if name.startswith("projector") else "llm"


def vlm_micro_batches(step):
    """[(rank, micro, ids, targets, image)] of one global batch (B = 1 per micro-batch)."""
    g = torch.Generator().manual_seed(100 + step)
    return [(r, m, torch.randint(0, VOCAB, (1, T), generator=g), torch.randint(0, VOCAB, (1, T), generator=g),
             torch.randn(1, DIM, generator=g)) for r in range(VLM_WORLD) for m in range(VLM_MICRO)]


def vlm_reference(train_tower, has_image):
    """Plain training on the same global batches: the mean of the micro-batch losses."""
    model = ToyVLM(train_tower)
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(vlm_group(name), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": VLM_LRS[g]} for g, ps in groups.items()], weight_decay=0.0)
    losses = []
    for step in range(VLM_STEPS):
        loss = sum(model(ids, tg, img if has_image(r, m) else None)
                   for r, m, ids, tg, img in vlm_micro_batches(step)) / (VLM_WORLD * VLM_MICRO)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _vlm_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for cls in (FSDP, PrefetchFSDP):
        for name, sc in VLM_SCENARIOS.items():
            model = ToyVLM(sc["train_tower"])
            fsdp = cls(model, units=list(model.tower) + list(model.blocks), group_fn=vlm_group)
            opt = optimizer_of(model, VLM_LRS, vlm_group)
            losses, stale = [], []
            for step in range(VLM_STEPS):
                total = torch.zeros(())
                for r, m, ids, tg, img in vlm_micro_batches(step):
                    if r == rank:
                        loss = model(ids, tg, img if sc["has_image"](r, m) else None) / VLM_MICRO
                        loss.backward()
                        total += loss.detach()
                fsdp.reduce_grads()
                # a unit still gathered now (a prefetch nobody used) would keep the old weights
                stale += [f"step {step + 1}: {u.name}" for u in fsdp.units[:-1] if any(f.is_gathered() for f in u.flats)]
                clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dist.all_reduce(total)
                losses.append(total.item() / world)
            results[(cls.__name__, name)] = {"losses": losses, "state": fsdp.full_state_dict(), "stale": stale}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_fsdp_text_only_micro_batches_match_single_process_training():
    """2 gloo ranks, with a rank whose micro-batches have no image, and with a first micro-batch
    that skips the tower: the step completes (no collective mismatch), no unit stays gathered
    into optimizer.step (it would keep the old weights), and losses and weights equal plain
    training on the same data, with and without prefetching."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_vlm_worker, args=(VLM_WORLD, free_port(), out_dir), nprocs=VLM_WORLD)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(VLM_WORLD)]
    for (engine, name), _ in results[0].items():
        sc = VLM_SCENARIOS[name]
        ref_losses, ref_state = vlm_reference(sc["train_tower"], sc["has_image"])
        for rank, res in enumerate(results):
            r = res[(engine, name)]
            assert not r["stale"], f"{name}: units kept the previous step's weights: {r['stale']}"
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6,
                                       msg=f"{name}: losses differ from plain training (rank {rank})")
            for k, v in ref_state.items():
                torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6,
                                           msg=f"{name}: {k} differs from plain training (rank {rank})")
