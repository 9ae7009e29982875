"""Hand-rolled fully sharded data parallelism (ZeRO-3), small enough to read in one sitting.

LLaVA-1.5 trains stage 2 with DeepSpeed ZeRO-3 (docs/llava.md §4): every rank keeps only 1/world of
the trainable weights, gradients and Adam state, and gathers a layer's full weights just
before it runs. This file does the same with plain torch.distributed collectives, in the
spirit of picotron and torchtitan's simple_fsdp:

- The model is cut into *units* (each decoder block, each vision-tower block, and the *root*:
  everything else: embeddings, projector, final norm, lm_head, image_newline).
- Per (unit, parameter group) the trainable parameters are flattened into ONE buffer padded
  to a multiple of the world size. Each rank keeps its 1/world slice as an fp32 master
  `shard` (an nn.Parameter the optimizer steps) -> params, grads and AdamW state are sharded.
- Forward: a forward-pre hook all-gathers the full flat buffer (bf16 on CUDA, fp32 on CPU)
  and points the module's weights at views of it; a forward hook frees it again.
- Backward: a hook on the unit's outputs re-gathers the buffer before the unit's backward;
  when autograd has accumulated the flat gradient (post-accumulate-grad hook) it is
  reduce-scattered (averaged over ranks) into the rank's shard gradient and freed. The root's
  flats are reduce-scattered at the end of backward, in a fixed order, zeros for a flat that got
  no gradient: a micro-batch without images never reaches the projector, and the ranks must
  still issue the same collectives in the same order (docs/gpu.md).
- Activation checkpointing composes: a forward that runs *inside* backward (the recompute)
  gathers if needed and never frees; the post-accumulate hook frees after the unit's backward.
- Frozen parameters (requires_grad=False: the LLM and tower in stage 1) are not flattened:
  they stay ordinary replicated parameters with no gradient and no optimizer state.
- The next unit's all-gather is prefetched (forward: next unit, backward: previous one, in the
  order of the first forward). On CUDA it runs on a side stream and reduce-scatters on another,
  overlapping with compute; on CPU (gloo) the same prefetches run synchronously, so the CPU
  tests exercise the prefetch order too. After each optimizer step every unit still gathered
  is freed: a prefetch its unit did not consume holds the previous step's weights.
- Contract: every rank runs the same units in the same order in each forward (train.py runs
  the vision tower on a dummy image for a micro-batch without images), and every backward
  reaches at least one root weight (the root's reduce-scatters are queued from there).
- World size 1 runs no collectives at all: units stay gathered and the "gather" after each
  optimizer step is a local copy of the master weights.

The root unit is never freed (it is small: embeddings + head, ~0.5 GB in bf16 for 7B), so the
model's own forward/loss methods need no hook and can be called freely.
"""
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

# torch >= 2.12 renamed the tensor collectives; keep working on older torch
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _in_backward():
    """True while autograd runs a backward pass (an activation-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(x):
    """All tensors in a nested module output (tensor, tuple, list, dict)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


class FlatParam:
    """The trainable parameters of one (unit, group), flattened, padded and sharded.

    shard: (padded // world,) fp32 nn.Parameter, this rank's master slice (the optimizer's param)
    flat:  (padded,) param_dtype leaf tensor holding the gathered full weights while the unit
           runs; its storage is resized to 0 when freed. Module weights are views into it.
    """

    def __init__(self, unit, group, names, params, slots, fsdp):
        self.unit, self.group, self.fsdp = unit, group, fsdp
        self.names = names                                   # full parameter names, in order
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.slots = slots                                   # per param: [(module, attr), ...]
        total = sum(self.numels)
        world, rank = fsdp.world, fsdp.rank
        self.padded = math.ceil(total / world) * world       # padding is never read: grads stay 0
        n = self.padded // world
        full = torch.zeros(self.padded, dtype=torch.float32, device=fsdp.device)
        full[:total] = torch.cat([p.detach().reshape(-1).float() for p in params])
        self.shard = nn.Parameter(full[rank * n:(rank + 1) * n].clone())
        self.flat = torch.zeros(self.padded, dtype=fsdp.param_dtype, device=fsdp.device,
                                requires_grad=True)
        self.flat.register_post_accumulate_grad_hook(lambda _: fsdp._grad_ready(self))
        self.event = None                                    # CUDA: gather in flight
        self.free()

    # ---- gather / free -------------------------------------------------------------------
    def is_gathered(self):
        return self.flat.untyped_storage().size() > 0

    def free(self):
        self.flat.untyped_storage().resize_(0)

    def gather(self, stream=None, refresh=False):
        """All-gather the shards into the full flat buffer (cast to param_dtype first)."""
        if self.is_gathered() and not refresh:
            return
        if not self.is_gathered():
            self.flat.untyped_storage().resize_(self.padded * self.flat.element_size())
        # write through .data: it has its own version counter, so refilling the buffer that
        # autograd saved in forward does not trip the "modified by an inplace op" check
        out = self.flat.data
        if self.fsdp.world == 1:
            out.copy_(self.shard.detach())
            return
        shard = self.shard.detach().to(self.fsdp.param_dtype)
        if stream is None:
            _all_gather(out, shard)
        else:                                                # CUDA prefetch on a side stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                _all_gather(out, shard)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            shard.record_stream(stream)

    def wait(self):
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            self.event = None

    def set_views(self):
        """Point every module weight at its slice of the gathered flat buffer.

        One split, not one slice per weight: each slice's backward would allocate a zero buffer
        the size of the whole flat and add them all up; split's backward is a single cat.
        """
        base = self.flat if torch.is_grad_enabled() else self.flat.detach()
        pieces = base.split(self.numels + [self.padded - sum(self.numels)])     # + the padding
        for piece, shape, slots in zip(pieces, self.shapes, self.slots):
            view = piece.view(shape)
            for module, attr in slots:
                setattr(module, attr, view)

    # ---- gradients -----------------------------------------------------------------------
    def reduce_scatter_grad(self):
        """Average the full gradient over ranks into shard.grad; zeros if this rank has none."""
        fsdp, grad = self.fsdp, self.flat.grad
        self.flat.grad = None
        if grad is None:                                 # the other ranks reduce theirs all the same
            if fsdp.world == 1:
                return
            grad = torch.zeros(self.padded, dtype=fsdp.reduce_dtype, device=fsdp.device)
        grad = grad.to(fsdp.reduce_dtype)
        if fsdp.world == 1:
            out = grad
        else:
            out = torch.empty(self.shard.numel(), dtype=fsdp.reduce_dtype, device=grad.device)
            if fsdp.rs_stream is not None:               # overlap with the backward compute
                fsdp.rs_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(fsdp.rs_stream):
                    _reduce_scatter(out, grad)
                    out.div_(fsdp.world)
                    self._accumulate(out)
                grad.record_stream(fsdp.rs_stream)
                out.record_stream(fsdp.rs_stream)
            else:
                _reduce_scatter(out, grad)               # gloo has no AVG: sum, then divide
                out.div_(fsdp.world)
        if fsdp.rs_stream is None or fsdp.world == 1:
            self._accumulate(out)
        if fsdp.reshard(self.unit):
            self.free()
            self.unit.pending -= 1
            if self.unit.pending <= 0:
                self.unit.in_backward = False

    def _accumulate(self, g):
        """shard.grad += g (gradient accumulation over micro-batches)."""
        if self.shard.grad is None:
            self.shard.grad = g.float()
        else:
            self.shard.grad.add_(g)


class Unit:
    """One FSDP unit: a module plus the flat params of its trainable weights (one per group)."""

    def __init__(self, name, module, is_root):
        self.name, self.module, self.is_root = name, module, is_root
        self.flats = []
        self.in_backward = False
        self.pending = 0


class FSDP:
    """Shard the trainable parameters of `model` over the default process group.

    units:     submodules that are gathered/freed one at a time (decoder blocks, tower blocks);
               the remaining trainable parameters form the always-gathered root unit.
    group_fn:  parameter name -> group name ("projector" | "llm" | "vision_tower"), used for
               per-group learning rates; a unit holding several groups gets one flat per group.
    param_dtype:  dtype of the gathered weights and of frozen weights (bf16 on CUDA, fp32 on CPU).
    reduce_dtype: dtype of the gradient reduce-scatter (fp32: exact averaging).
    device:       where shards, gathered weights, frozen weights and buffers live (default: the
                  model's); the model may still be on CPU, it is moved unit by unit.
    """

    def __init__(self, model, units, group_fn=lambda name: "default", param_dtype=None,
                 reduce_dtype=torch.float32, device=None):
        self.model = model
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.param_dtype = param_dtype or (torch.bfloat16 if cuda else torch.float32)
        self.reduce_dtype = reduce_dtype
        overlap = cuda and self.world > 1
        self.ag_stream = torch.cuda.Stream() if overlap else None
        self.rs_stream = torch.cuda.Stream() if overlap else None

        # every module -> its full name, and each unit module -> Unit
        mod_name = {m: n for n, m in model.named_modules()}
        self.root = Unit("", model, True)
        self.units = [Unit(mod_name[m], m, False) for m in units] + [self.root]
        unit_of = {u.module: u for u in self.units}

        # assign each trainable parameter (deduplicated: tied weights) to its innermost unit
        owner, slots, names = {}, {}, {}
        for mname, module in model.named_modules():
            for attr, p in list(module._parameters.items()):
                if p is None or not p.requires_grad:
                    continue
                if id(p) not in slots:
                    slots[id(p)], names[id(p)] = [], f"{mname}.{attr}".lstrip(".")
                    m, unit = mname, None
                    while unit is None:                   # walk up to the innermost unit
                        unit = unit_of.get(model.get_submodule(m))
                        m = m.rsplit(".", 1)[0] if "." in m else ""
                    owner[id(p)] = (unit, p)
                slots[id(p)].append((module, attr))
        self.trainable_names = set(names.values())
        for unit in self.units:
            groups = {}
            for pid, (u, p) in owner.items():
                if u is unit:
                    groups.setdefault(group_fn(names[pid]), []).append(pid)
            for group, pids in groups.items():
                flat = FlatParam(unit, group, [names[i] for i in pids], [owner[i][1] for i in pids],
                                 [slots[i] for i in pids], self)
                unit.flats.append(flat)
                # the original Parameters leave the modules (freed unit by unit, so the full
                # unsharded model never exists twice): from now on the weights are views
                for i in pids:
                    for module, attr in slots[i]:
                        del module._parameters[attr]
                    owner[i] = (unit, None)
        # frozen weights stay replicated, in the compute dtype, on the device
        for p in model.parameters():
            p.data = p.data.to(self.device, self.param_dtype if p.is_floating_point() else p.dtype)
        for module in model.modules():
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(self.device)

        self.order = []                                    # unit execution order (for prefetch)
        self.root_queued = None                            # backward whose root reduce is queued
        for unit in self.units:
            if not unit.flats:
                continue
            if self.reshard(unit):
                unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._pre_forward(u))
                unit.module.register_forward_hook(lambda m, a, out, u=unit: self._post_forward(u, out))
            else:                                          # root (and world 1): gathered for good
                for flat in unit.flats:
                    flat.gather()
                    with torch.enable_grad():              # views that track grad, even if
                        flat.set_views()                   # FSDP is built under no_grad

    @property
    def flats(self):
        return [f for u in self.units for f in u.flats]

    def reshard(self, unit):
        """Free this unit's full weights between uses? (not the root, nothing at world 1)"""
        return self.world > 1 and not unit.is_root

    # ---- hooks ---------------------------------------------------------------------------
    def _pre_forward(self, unit):
        if not _in_backward():                             # a fresh forward: any backward is over
            unit.in_backward = False
            if unit not in self.order:
                self.order.append(unit)                    # the first forward records the order
        for flat in unit.flats:
            flat.gather()
            flat.wait()
            flat.set_views()
        if not _in_backward():
            self._prefetch(unit, +1)

    def _post_forward(self, unit, output):
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(lambda g, u=unit: self._pre_backward(u))
        # a forward inside backward is a checkpoint recompute: its weights are needed right now
        if self.reshard(unit) and not _in_backward():
            for flat in unit.flats:
                flat.free()

    def _pre_backward(self, unit):
        if unit.in_backward:
            return
        unit.in_backward, unit.pending = True, len(unit.flats)
        for flat in unit.flats:                            # autograd saved views of this buffer
            flat.gather()
            flat.wait()
        self._prefetch(unit, -1)

    def _prefetch(self, unit, step):
        """Start the all-gather of the next unit (forward) / previous unit (backward); on CPU it
        runs synchronously."""
        if unit not in self.order:
            return
        i = self.order.index(unit) + step
        if 0 <= i < len(self.order):
            for flat in self.order[i].flats:
                flat.gather(self.ag_stream)

    def _grad_ready(self, flat):
        """Post-accumulate-grad hook. A sharded unit's gradient is complete once its backward
        has run: reduce-scatter it now. The root's flats are used at both ends of the model
        (lm_head first, embeddings last) and which of them get a gradient depends on the data,
        so they wait for the end of this backward and go in a fixed order."""
        if not flat.unit.is_root:
            flat.reduce_scatter_grad()
            return
        task = torch._C._current_graph_task_id()
        if self.root_queued != task:
            self.root_queued = task
            Variable._execution_engine.queue_callback(self._reduce_root)

    def _reduce_root(self):
        for flat in self.root.flats:
            flat.reduce_scatter_grad()

    # ---- optimizer -----------------------------------------------------------------------
    def param_groups(self, lrs):
        """AdamW param groups over the shards, one per group name: lrs = {"llm": 2e-5, ...}."""
        groups = {}
        for flat in self.flats:
            if flat.group not in lrs:
                raise ValueError(f"no learning rate for parameter group {flat.group!r}")
            groups.setdefault(flat.group, []).append(flat.shard)
        return [{"params": ps, "lr": lrs[g], "initial_lr": lrs[g], "name": g}
                for g, ps in groups.items()]

    def optimizer(self, lrs, **adamw_kwargs):
        """torch AdamW over this rank's shards; after each step the gathered units refresh."""
        opt = torch.optim.AdamW(self.param_groups(lrs), **adamw_kwargs)
        opt.register_step_pre_hook(lambda *_: self.wait_for_gradients())
        opt.register_step_post_hook(lambda *_: self.refresh_gathered())
        return opt

    @torch.no_grad()
    def refresh_gathered(self):
        """After the master shards change: copy them into the units that stay gathered (root;
        world 1) and free every other unit still gathered, e.g. by a prefetch that its unit did
        not consume (a first forward that skipped the tower records an order that prefetches a
        decoder block after its backward); gather() would keep those old weights."""
        for unit in self.units:
            for flat in unit.flats:
                if not self.reshard(unit):
                    flat.gather(refresh=True)
                elif flat.is_gathered():
                    flat.wait()                            # an all-gather may still be writing it
                    flat.free()

    def wait_for_gradients(self):
        """Make the current stream wait for in-flight reduce-scatters (CUDA)."""
        if self.rs_stream is not None:
            torch.cuda.current_stream().wait_stream(self.rs_stream)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm):
        """Global L2 norm over all shards (all-reduce of squared norms), clip to max_norm."""
        self.wait_for_gradients()
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for flat in self.flats:
            if flat.shard.grad is not None:
                sq += flat.shard.grad.float().pow(2).sum()
        if self.world > 1:
            dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm is not None and max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for flat in self.flats:
                if flat.shard.grad is not None:
                    flat.shard.grad.mul_(coef)
        return norm

    # ---- state ---------------------------------------------------------------------------
    def layout(self):
        """What a sharded checkpoint depends on: names, shapes and world size."""
        return {"world": self.world, "flats": [
            {"unit": f.unit.name, "group": f.group, "names": f.names,
             "shapes": [list(s) for s in f.shapes]} for f in self.flats]}

    def sharded_state_dict(self):
        """This rank's master shards: {"<unit>|<group>": (padded // world,) fp32}."""
        return {f"{f.unit.name}|{f.group}": f.shard.detach().cpu().clone() for f in self.flats}

    @torch.no_grad()
    def load_sharded_state_dict(self, sd):
        for f in self.flats:
            key = f"{f.unit.name}|{f.group}"
            if key not in sd or sd[key].shape != f.shard.shape:
                raise ValueError(f"sharded checkpoint does not match this model/world size at {key!r}")
            f.shard.copy_(sd[key])
        self.refresh_gathered()

    @torch.no_grad()
    def full_state_dict(self):
        """Consolidated fp32 weights on every rank (CPU): gathered trainable + frozen params."""
        sd = {}
        for f in self.flats:
            full = torch.empty(f.padded, dtype=torch.float32, device=self.device)
            if self.world == 1:
                full.copy_(f.shard)
            else:
                _all_gather(full, f.shard.detach())
            for name, off, n, shape in zip(f.names, f.offsets, f.numels, f.shapes):
                sd[name] = full[off:off + n].view(shape).cpu().clone()
        for name, p in self.model.named_parameters():
            sd.setdefault(name, p.detach().cpu())
        return sd

    @torch.no_grad()
    def unwrap(self, dtype=torch.float32):
        """Put real, full nn.Parameters back into the model (for export); FSDP is unusable after."""
        sd = self.full_state_dict()
        for f in self.flats:
            for name, slots in zip(f.names, f.slots):
                p = nn.Parameter(sd[name].to(self.device, dtype), requires_grad=True)
                for module, attr in slots:
                    if attr in module.__dict__:
                        del module.__dict__[attr]
                    module.register_parameter(attr, p)
            f.free()
        self.units = []
        for p in self.model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        return self.model

    def local_bytes(self, optimizer=None):
        """Bytes this rank holds for sharded training state: master shards, grads, optimizer."""
        n = sum(f.shard.numel() * f.shard.element_size() for f in self.flats)
        n += sum(f.shard.grad.numel() * f.shard.grad.element_size()
                 for f in self.flats if f.shard.grad is not None)
        if optimizer is not None:
            for state in optimizer.state.values():
                n += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
        return n
