"""Fully sharded data parallelism (ZeRO-3) by hand, in two layers: plain, then overlapped.

LLaVA-1.5 trains stage 2 with DeepSpeed ZeRO-3 (docs/llava.md §4): every rank keeps 1/world of
the trainable weights, their gradients and the Adam state, and gathers a block's full weights
just before it runs. `FSDP` does that synchronously with plain torch.distributed collectives;
`PrefetchFSDP` adds the overlap of communication with compute on top, as picotron goes from
DataParallelNaive to DataParallelBucket. `train.py --fsdp torch` runs PyTorch's own FSDP2
(`fully_shard`) on the same units instead; docs/fsdp.md compares the two.

FSDP, step by step:
- Units: the modules gathered one at a time (each decoder block, each vision block). The *root*
  unit is everything else: embeddings, projector, final norm, lm_head, image_newline.
- Flat shards: per (unit, parameter group) the trainable weights are flattened into ONE buffer,
  padded to a multiple of the world size. Rank r keeps slice r of it as an fp32 nn.Parameter,
  the *shard*, registered as `<group>_shard` on the smallest module holding those weights
  (`language_model.model.layers.0.llm_shard`): after wrapping, `model.named_parameters()` lists
  the shards (what the optimizer steps) and the frozen weights, which stay whole on every rank,
  in the compute dtype, with no gradient and no optimizer state.
- Forward: a pre-hook all-gathers a unit's flat (in param_dtype) and points its weights at views
  of it; a post-hook frees it. The root is gathered at the first forward after its shards changed
  (the start, each step's reduce_grads()) and kept: it is used at both ends (embeddings first,
  lm_head last), and it is small enough to keep.
- Backward: a hook on the unit's outputs gathers it again (autograd saved views of the buffer);
  once autograd has accumulated the flat's gradient, it is reduce-scattered (averaged over ranks)
  into shard.grad and the flat is freed.
- The root's gradients add up locally, in fp32, over the step's micro-batches; `reduce_grads()`,
  called once after the step's last backward, reduce-scatters them in a fixed order (zeros for a
  flat that got none here). Which root flats get a gradient depends on the data, so that order
  must not come from autograd.
- Activation checkpointing: a forward that runs inside the unit's backward (the recompute) keeps
  its weights (`unit.in_backward`).
- Contract: every rank runs the same units in the same order in each forward (LLaVA's forward runs
  the vision tower on a zero image for a batch without images) and calls the model's forward
  (its root hook), not a submodule directly.
One rank is no special case: its "collectives" move the data to itself.
"""
import math
import os

import torch
import torch.distributed as dist
from torch import nn

# torch >= 2.12 renamed the tensor collectives; keep working on older torch
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    """The trainable weights of one (unit, group), flattened, padded and sharded.

    shard: (padded // world,) fp32 nn.Parameter, this rank's slice of the master weights
    flat:  (padded,) param_dtype leaf holding the gathered weights while the unit runs; its
           storage is resized to 0 when freed. The module's weights are views into it.
    """

    def __init__(self, unit, group, names, params, slots, fsdp):
        self.unit, self.group, self.fsdp = unit, group, fsdp
        self.names = names                                   # full parameter names, in order
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.slots = slots                                   # per param: [(module, attr), ...]
        total, world = sum(self.numels), fsdp.world
        self.padded = math.ceil(total / world) * world       # padding is never read: grads stay 0
        n = self.padded // world
        full = torch.zeros(self.padded, dtype=torch.float32, device=fsdp.device)
        full[:total] = torch.cat([p.detach().reshape(-1).float() for p in params])
        self.shard = nn.Parameter(full[fsdp.rank * n:(fsdp.rank + 1) * n].clone())
        self.flat = torch.zeros(self.padded, dtype=fsdp.param_dtype, device=fsdp.device, requires_grad=True)
        self.flat.register_post_accumulate_grad_hook(lambda _: fsdp._grad_ready(self))
        self.grad_sum = None                                 # root: fp32 gradient of the step so far
        self.free()

    def is_gathered(self):
        return self.flat.untyped_storage().size() > 0

    def free(self):
        self.flat.untyped_storage().resize_(0)

    def allocate(self):
        if not self.is_gathered():
            self.flat.untyped_storage().resize_(self.padded * self.flat.element_size())

    def gather(self):
        """All-gather the shards into the full flat buffer (cast to param_dtype first). It writes
        through .data, which has its own version counter: refilling the buffer that autograd saved
        in forward does not trip the "modified by an inplace operation" check."""
        self.allocate()
        _all_gather(self.flat.data, self.shard.detach().to(self.fsdp.param_dtype))

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

    def reduce_scatter(self, grad):
        """shard.grad += this rank's slice of `grad` (padded,), averaged over the ranks."""
        fsdp = self.fsdp
        out = torch.empty(self.shard.numel(), dtype=fsdp.reduce_dtype, device=grad.device)
        _reduce_scatter(out, grad.to(fsdp.reduce_dtype))     # gloo has no AVG: sum, then divide
        out = out.div_(fsdp.world).float()
        if self.shard.grad is None:
            self.shard.grad = out
        else:
            self.shard.grad.add_(out)


class Unit:
    """One FSDP unit: a module plus the flat params of its trainable weights (one per group)."""

    def __init__(self, name, module):
        self.name, self.module = name, module
        self.flats = []
        self.in_backward = False                             # between its pre-backward and its last reduce
        self.pending = 0                                     # flats whose gradient has not arrived yet


class FSDP:
    """Shard the trainable parameters of `model` over the default process group (initialise it
    first, one rank too).

    units:        submodules gathered and freed one at a time (decoder blocks, tower blocks);
                  the remaining trainable parameters form the root unit.
    group_fn:     parameter name -> group name ("projector" | "llm" | "vision_tower"); a unit
                  holding several groups gets one flat per group (the optimizer's lr per group).
    param_dtype:  dtype of the gathered weights and of the frozen ones (bf16 for bf16 training).
    reduce_dtype: dtype of the gradient reduce-scatter (fp32: exact averaging).
    device:       where shards, gathered and frozen weights live (default: the model's); the
                  model may still be on CPU, it is moved unit by unit.
    """

    def __init__(self, model, units, group_fn=lambda name: "default", param_dtype=torch.float32,
                 reduce_dtype=torch.float32, device=None):
        if not dist.is_initialized():
            raise RuntimeError("FSDP shards over the default process group: call dist.init_process_group "
                               "first (one rank too: store=dist.HashStore(), rank=0, world_size=1)")
        self.model = model
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype

        mod_name = {m: n for n, m in model.named_modules()}
        self.root = Unit("", model)
        self.root_stale = True                               # its gathered weights are not the shards'
        self.units = [Unit(mod_name[m], m) for m in units] + [self.root]
        unit_of = {u.module: u for u in self.units}

        # each trainable parameter (once: tied weights share it) goes to its innermost unit
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
        for unit in self.units:
            groups = {}
            for pid, (u, p) in owner.items():
                if u is unit:
                    groups.setdefault(group_fn(names[pid]), []).append(pid)
            for group, pids in groups.items():
                unit.flats.append(FlatParam(unit, group, [names[i] for i in pids], [owner[i][1] for i in pids],
                                            [slots[i] for i in pids], self))
                # the original Parameters leave the modules (unit by unit, so the full model never
                # exists twice): from now on the weights are views of the flat buffer
                for i in pids:
                    for module, attr in slots[i]:
                        del module._parameters[attr]
                    owner[i] = (unit, None)
        # frozen weights stay whole on every rank, in the compute dtype, on the device
        for p in model.parameters():
            p.data = p.data.to(self.device, self.param_dtype if p.is_floating_point() else p.dtype)
        for module in model.modules():
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(self.device)
        # the shards become the model's trainable parameters, each on the smallest module that
        # holds all of its weights: its name says where it comes from (language_model.llm_shard)
        for flat in self.flats:
            where = os.path.commonprefix([name.split(".")[:-1] for name in flat.names])
            model.get_submodule(".".join(where)).register_parameter(f"{flat.group}_shard", flat.shard)

        model.register_forward_pre_hook(lambda m, args: self._gather_root())
        for unit in self.units[:-1]:
            if unit.flats:
                unit.module.register_forward_pre_hook(lambda m, args, u=unit: self._pre_forward(u))
                unit.module.register_forward_hook(lambda m, args, out, u=unit: self._post_forward(u, out))

    @property
    def flats(self):
        return [f for u in self.units for f in u.flats]

    # ---- hooks ---------------------------------------------------------------------------
    def _gather_root(self):
        """Every forward of the model: the root's weights, gathered again only once the shards changed
        (the micro-batches of a step share them); its views follow the grad mode."""
        for flat in self.root.flats:
            if self.root_stale:
                flat.gather()
            flat.set_views()
        self.root_stale = False

    def _gather(self, flat):
        if not flat.is_gathered():
            flat.gather()

    def _pre_forward(self, unit):
        for flat in unit.flats:
            self._gather(flat)
            flat.set_views()

    def _post_forward(self, unit, output):
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(lambda g, u=unit: self._pre_backward(u))
        if not unit.in_backward:                           # a recompute keeps what backward needs
            for flat in unit.flats:
                flat.free()

    def _pre_backward(self, unit):
        if unit.in_backward:                               # one hook per output tensor
            return
        unit.in_backward, unit.pending = True, len(unit.flats)
        for flat in unit.flats:
            self._gather(flat)

    def _grad_ready(self, flat):
        """Post-accumulate-grad hook of a flat buffer: its gradient of this backward is complete."""
        grad, flat.flat.grad = flat.flat.grad, None
        if flat.unit is self.root:                         # reduced once per step, by reduce_grads()
            flat.grad_sum = grad.float() if flat.grad_sum is None else flat.grad_sum.add_(grad)
            return
        self._reduce_scatter(flat, grad)
        flat.free()
        flat.unit.pending -= 1
        if flat.unit.pending == 0:
            flat.unit.in_backward = False

    def _reduce_scatter(self, flat, grad):
        flat.reduce_scatter(grad)

    # ---- once per optimizer step ---------------------------------------------------------
    def reduce_grads(self):
        """After the step's last backward, before clipping and optimizer.step(): reduce-scatter
        the root's gradients, summed over the micro-batches, in a fixed order."""
        for flat in self.root.flats:
            grad = flat.grad_sum if flat.grad_sum is not None else torch.zeros(
                flat.padded, dtype=torch.float32, device=self.device)
            self._reduce_scatter(flat, grad)
            flat.grad_sum = None
        for unit in self.units:
            unit.in_backward = False
        self.root_stale = True                             # optimizer.step() is about to change the shards

    # ---- checkpoints and export ----------------------------------------------------------
    def pieces(self):
        """This rank's part of every trainable weight: [(name, shape, start, shard, lo, hi)], the
        weight's flattened elements [start, start + hi - lo) are shard[lo:hi] (train_checkpoint.py)."""
        out = []
        for f in self.flats:
            n = f.shard.numel()
            first = self.rank * n                          # this shard's first element in the flat
            for name, shape, offset, numel in zip(f.names, f.shapes, f.offsets, f.numels):
                lo, hi = max(offset, first), min(offset + numel, first + n)
                if lo < hi:
                    out.append((name, tuple(shape), lo - offset, f.shard, lo - first, hi - first))
        return out

    @torch.no_grad()
    def full_state_dict(self, keep=True):
        """Every weight whole, on CPU (all ranks take part): the trainable ones gathered from the
        fp32 shards, the frozen ones as they are. keep=False: take part in the gathers, hold nothing."""
        sd = {}
        for f in self.flats:
            full = torch.empty(f.padded, dtype=torch.float32, device=self.device)
            _all_gather(full, f.shard.detach())
            for name, off, n, shape in zip(f.names, f.offsets, f.numels, f.shapes):
                if keep:
                    sd[name] = full[off:off + n].view(shape).cpu().clone()
        if not keep:                                       # a rank that only takes part in the gathers
            return sd
        shards = {id(f.shard) for f in self.flats}
        for name, p in self.model.named_parameters():
            if id(p) not in shards:
                sd[name] = p.detach().cpu()
        return sd


class PrefetchFSDP(FSDP):
    """FSDP with its communication overlapped with compute: the plain version above, plus

    - prefetch: when a unit starts its forward, the next unit's all-gather starts too (in
      backward: the previous unit's), in the order of the first forward;
    - CUDA side streams: all-gathers run on `ag_stream`, reduce-scatters on `rs_stream`, so the
      compute stream does not wait for them until it needs their result (events, wait_stream;
      record_stream keeps a buffer alive while a side stream still uses it). On CPU the same
      prefetches run synchronously, so the CPU tests exercise the order;
    - `reduce_grads()` also frees every unit still gathered: a prefetch that its unit did not
      consume holds the weights of before optimizer.step().
    """

    def __init__(self, model, units, **kwargs):
        super().__init__(model, units, **kwargs)
        cuda = self.device.type == "cuda"
        self.ag_stream = torch.cuda.Stream() if cuda else None
        self.rs_stream = torch.cuda.Stream() if cuda else None
        self.order = []                                    # units in the order of the first forward
        self.events = {}                                   # flat -> CUDA event of its prefetch

    def _pre_forward(self, unit):
        if not unit.in_backward and unit not in self.order:
            self.order.append(unit)
        super()._pre_forward(unit)
        if not unit.in_backward:
            self._prefetch(unit, +1)

    def _pre_backward(self, unit):
        if not unit.in_backward:
            super()._pre_backward(unit)
            self._prefetch(unit, -1)

    def _prefetch(self, unit, step):
        """Start the all-gather of the next unit (forward) / the previous one (backward)."""
        i = self.order.index(unit) + step if unit in self.order else -1
        if not 0 <= i < len(self.order):
            return
        for flat in self.order[i].flats:
            if flat.is_gathered():
                continue
            if self.ag_stream is None:
                flat.gather()
                continue
            flat.allocate()                                # on the compute stream: ordered reuse
            shard = flat.shard.detach().to(self.param_dtype)
            self.ag_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.ag_stream):
                _all_gather(flat.flat.data, shard)
                self.events[flat] = torch.cuda.Event()
                self.events[flat].record(self.ag_stream)
            shard.record_stream(self.ag_stream)

    def _gather(self, flat):
        event = self.events.pop(flat, None)
        if event is not None:                              # prefetched: wait for it
            torch.cuda.current_stream().wait_event(event)
        super()._gather(flat)

    def _reduce_scatter(self, flat, grad):
        if self.rs_stream is None:
            return super()._reduce_scatter(flat, grad)
        self.rs_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.rs_stream):
            super()._reduce_scatter(flat, grad)
        grad.record_stream(self.rs_stream)

    def reduce_grads(self):
        super().reduce_grads()
        if self.rs_stream is not None:                     # clip and step read shard.grad
            torch.cuda.current_stream().wait_stream(self.rs_stream)
        for unit in self.units[:-1]:
            for flat in unit.flats:
                event = self.events.pop(flat, None)
                if event is not None:                      # an all-gather may still be writing it
                    torch.cuda.current_stream().wait_event(event)
                flat.free()
