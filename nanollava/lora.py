"""LoRA (Hu et al. 2021) the way LLaVA-1.5 fine-tunes with it (scripts/v1_5/finetune_lora.sh).

Every linear layer of the LLM gets a low-rank update (q, k, v, o, gate, up, down in each decoder
block; not lm_head, the projector or the vision tower: LLaVA's `find_all_linear_names`):

    y = x W^T + b + (alpha / r) (x A^T) B^T        W (out, in), b frozen; A (r, in), B (out, r)

A starts as nn.Linear's weight init (kaiming uniform), B as zeros, so training starts exactly at
the pretrained model. LLaVA-1.5: r 128, alpha 256, the adapters at lr 2e-4 and the projector
fully trained at its own lr (mm_projector_lr 2e-5). LLaVA also drops 5% of the adapters' input;
nanollava does not: dropout draws from each rank's RNG, which would make a step depend on the
world size (docs/fsdp.md).

The adapters live on their layer (`q_proj.lora_A`, `q_proj.lora_B`) and the base weight keeps its
key, so base checkpoints load unchanged. `merge_lora` folds the adapters into W for the llava-hf
export (transformers loads a plain model); `save_adapters` / `load_adapters` keep just the trained
weights (adapters + projector: LLaVA's adapter_model + non_lora_trainables) to apply to the base.
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from nanollava import files

TRAINED_WITH_LORA = ("multi_modal_projector.", "image_newline")   # fully trained beside the adapters


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias plus a trainable rank-r update scaled by alpha / r."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias            # the same Parameters, same keys
        self.scaling = alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))     # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))    # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                                          # (B, T, out)
        return y.add_(F.linear(F.linear(x, self.lora_A), self.lora_B), alpha=self.scaling)   # in place: no copies

    def merged(self):
        """W + (alpha / r) B A, as a plain nn.Linear (computed in fp32)."""
        w = self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        linear = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None, device=w.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _llm_linears(model, kind):
    """(parent module, attribute) of every `kind` layer inside the LLM's decoder blocks."""
    return [(parent, name) for parent in model.language_model.model.layers.modules()
            for name, child in parent.named_children() if type(child) is kind]


def add_lora(model, r=128, alpha=256):
    """Wrap every linear layer of the LLM's decoder blocks in a LoRALinear (new, trainable adapters)."""
    for parent, name in _llm_linears(model, nn.Linear):
        setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha))
    model.lora = dict(r=r, alpha=alpha)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight: a plain LLaVA that computes the same function."""
    for parent, name in _llm_linears(model, LoRALinear):
        setattr(parent, name, getattr(parent, name).merged())
    model.__dict__.pop("lora", None)
    return model


def save_adapters(model, path):
    """The weights LoRA training changes (adapters + projector), with r and alpha, as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if ".lora_" in k or k.startswith(TRAINED_WITH_LORA)}
    with files.replacing(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "lora": json.dumps(model.lora)})


@torch.no_grad()
def load_adapters(model, path):
    """Apply save_adapters' file to a base LLaVA (adds the adapters first): the LoRA-trained model."""
    with safe_open(path, "pt") as f:
        lora = json.loads((f.metadata() or {}).get("lora", "null") or "null")
        if not isinstance(lora, dict):
            raise ValueError(f"{path}: not a LoRA adapter file (no r / alpha in its metadata)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    add_lora(model, **lora)
    expected = {k for k in model.state_dict() if ".lora_" in k}
    if not expected <= set(state):
        raise ValueError(f"{path}: adapters missing for {sorted(expected - set(state))[:3]} ...; "
                         f"was it trained on another LLM?")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: weights this model does not have: {unexpected[:3]}")
    return model
