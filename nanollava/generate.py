"""Autoregressive decoding with a preallocated KV cache: one prefill, then one token per step.

Works for a `LLaVA` (images are encoded once, in the prefill) and a bare `LlamaForCausalLM`.
Greedy when temperature == 0 (the LLaVA evaluation protocol), else temperature / top-k / top-p
(nucleus) sampling. Batched prompts are LEFT padded (attention_mask 0 on the left) so every
row's next token sits in the last column.
"""
import torch

from nanollava.llama import KVCache


def sample_next(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None):
    """Next token (B,) from last-position logits (B, V): argmax, or sample after top-k / top-p filtering."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p            # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, max_new_tokens=32,
           temperature=0.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=None, generator=None,
           pixel_values_videos=None):
    """Yield the next token of every row, (B,) long, once per step.

    eos_token_id (int or list; default: the model config's) ends a row; a finished row keeps
    yielding pad_token_id (default: the config's pad, else the first eos). The stream stops after
    max_new_tokens steps or as soon as every row has produced an eos.
    """
    text = getattr(model.config, "text", model.config)
    B, T = input_ids.shape
    device = input_ids.device
    eos = text.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                       dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = text.pad_token_id if text.pad_token_id is not None else int(eos[0]) if len(eos) else 0
    if max_new_tokens <= 0:
        return
    dtype = next(model.parameters()).dtype
    cache = KVCache(B, T + max_new_tokens, text.num_hidden_layers, text.num_key_value_heads, text.head_dim,
                    dtype, device)
    # The mask for the whole run, built once; step t sees its first T + t columns.
    mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :T] = attention_mask
    images = {k: v for k, v in dict(pixel_values=pixel_values, image_sizes=image_sizes,
                                    pixel_values_videos=pixel_values_videos).items() if v is not None}
    logits = model(input_ids, attention_mask=mask[:, :T], kv_cache=cache, logits_to_keep=1, **images)
    position = mask[:, :T].sum(-1, keepdim=True)                   # (B, 1) next position of each row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        sampled = sample_next(logits[:, -1], temperature, top_p, top_k, generator)    # (B,) vocabulary ids
        token = sampled.masked_fill(done, pad_token_id)
        done |= torch.isin(token, eos)
        yield token
        if step == max_new_tokens - 1 or bool(done.all()):
            return
        # finished rows feed back what they sampled, never pad_token_id, which may lie past the embedding
        logits = model(sampled[:, None], attention_mask=mask[:, :T + step + 1], position_ids=position + step,
                       kv_cache=cache, logits_to_keep=1)


def generate(model, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, max_new_tokens=32,
             temperature=0.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=None, generator=None,
             pixel_values_videos=None):
    """New tokens (B, n) long, n <= max_new_tokens (fewer when every row hit eos early).

    Each row holds its generated tokens up to and including its first eos, then pad_token_id.
    """
    tokens = list(stream(model, input_ids, pixel_values, image_sizes, attention_mask, max_new_tokens,
                         temperature, top_p, top_k, eos_token_id, pad_token_id, generator, pixel_values_videos))
    if not tokens:
        return torch.zeros(input_ids.shape[0], 0, dtype=torch.long, device=input_ids.device)
    return torch.stack(tokens, dim=1)
