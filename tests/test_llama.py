"""LLaMA decoder parity with HF transformers' LlamaForCausalLM / Qwen2ForCausalLM, in float32,
plus the KV cache and the config readers."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanollava import checkpoint
from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
from nanollava.llama import KVCache, LlamaForCausalLM

transformers = pytest.importorskip("transformers")

V = 61  # small odd vocab


def assert_close(out, ref, what="logits"):
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{what} differ from HF by {err:.3g} (tolerance {tol:.3g})"


def hf_and_nano(qwen2=False, **kw):
    """A random-weight HF causal LM and a nanollava LlamaForCausalLM loaded from its state dict as is."""
    kw = {**dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, attn_implementation="eager"), **kw}
    if qwen2:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    hf.eval()
    nano = LlamaForCausalLM(checkpoint.read_text_config(hf.config.to_dict(), "hf")).eval()
    state = hf.state_dict()
    if nano.lm_head is None:                              # tied: the logits reuse embed_tokens.weight
        del state["lm_head.weight"]
    nano.load_state_dict(state, strict=True)              # keys are HF's, nothing renamed
    return hf, nano


@settings(max_examples=12, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), theta=st.sampled_from([100.0, 10000.0, 5e5]), tied=st.booleans(),
       bias=st.booleans(), qwen2=st.booleans(), head_dim=st.sampled_from([None, 4, 12]), T=st.integers(1, 12))
def test_logits_match_hf(kv_heads, theta, tied, bias, qwen2, head_dim, T):
    torch.manual_seed(0)
    kw = dict(num_key_value_heads=kv_heads, rope_parameters={"rope_type": "default", "rope_theta": theta},
              tie_word_embeddings=tied)
    if head_dim:
        kw["head_dim"] = head_dim
    if not qwen2:
        kw["attention_bias"] = bias
    hf, nano = hf_and_nano(qwen2, **kw)
    assert nano.config.qkv_bias == qwen2 and nano.config.rope_theta == theta
    assert (nano.lm_head is None) == tied
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert_close(nano(ids), hf(ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_hf_on_real_positions(side):
    torch.manual_seed(0)
    hf, nano = hf_and_nano()
    B, T = 3, 9
    lengths = torch.tensor([9, 5, 2])
    real = torch.arange(T)[None] < lengths[:, None]                 # right padding
    if side == "left":
        real = real.flip(-1)
    mask = real.long()
    ids = torch.randint(0, V, (B, T)).masked_fill(~real, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = nano(ids, attention_mask=mask, position_ids=pos)
        out_default_pos = nano(ids, attention_mask=mask)            # cumsum - 1 is the default
    assert_close(out[real], ref[real])
    assert_close(out_default_pos[real], ref[real])
    # each row alone, unpadded, gives the same logits as inside the padded batch
    for b in range(B):
        alone = nano(ids[b][real[b]][None])[0]
        assert_close(out[b][real[b]], alone, f"row {b} batched vs alone")


def test_kv_cache_prefill_then_single_steps_equals_full_forward():
    torch.manual_seed(0)
    _, nano = hf_and_nano(num_key_value_heads=1)
    c = nano.config
    B, T, P = 2, 11, 5
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0                                                  # left padding in row 1
    with torch.no_grad():
        full = nano(ids, attention_mask=mask)
        cache = KVCache(B, T + 3, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        steps = [nano(ids[:, :P], attention_mask=mask[:, :P], kv_cache=cache)]
        for t in range(P, T):
            steps.append(nano(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    assert cache.pos == T
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    assert_close(cached[real], full[real], "cached logits vs full forward")


def test_kv_cache_overflow_and_bad_mask_are_clear_errors():
    _, nano = hf_and_nano()
    c = nano.config
    cache = KVCache(1, 4, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    with pytest.raises(ValueError, match="overflow"):
        nano(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        nano(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_inputs_embeds_equals_input_ids():
    _, nano = hf_and_nano()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        assert torch.equal(nano(ids), nano(inputs_embeds=nano.model.embed_tokens(ids)))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    _, nano = hf_and_nano()
    nano.train()
    ids = torch.randint(0, V, (2, 7))
    grads = []
    for flag in (False, True):
        nano.gradient_checkpointing = flag
        nano.zero_grad()
        nano(ids).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in nano.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_config_reads_old_and_new_rope_layouts_and_qwen2():
    read = checkpoint.read_text_config
    old = read({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 1e6}, "c.json")
    new = read({"hidden_size": 64, "num_attention_heads": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "c.json")
    assert old == new and old.rope_theta == 1e6 and old.head_dim == 16 and old.num_key_value_heads == 4
    assert old.rms_norm_eps == 1e-6 and old.max_position_embeddings == 2048      # LlamaConfig defaults
    assert read({"model_type": "qwen2"}, "c.json").qkv_bias
    with pytest.raises(ValueError, match="c.json: rope_scaling type = 'llama3'"):
        read({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "c.json")


def test_llava_config_reads_both_token_keys_and_tie_locations():
    base = {"model_type": "llava", "text_config": {"vocab_size": 100}, "vision_config": {"hidden_size": 64}}
    read = checkpoint.read_llava_hf_config
    a = read({**base, "image_token_index": 7, "tie_word_embeddings": True}, "c.json")
    b = read({**base, "image_token_id": 7, "text_config": {"vocab_size": 100, "tie_word_embeddings": True}}, "c.json")
    assert a == b and a.image_token_id == 7 and a.text.tie_word_embeddings
    assert read({"model_type": "llava"}, "c.json").vision == VisionConfig()     # CLIP-L/336 when absent
    nxt = read({"model_type": "llava_next", "image_grid_pinpoints": [[336, 672]]}, "c.json")
    assert nxt.image_aspect_ratio == "anyres" and nxt.image_grid_pinpoints == [[336, 672]]


def test_llava_config_to_hf_loads_in_transformers_and_round_trips(tmp_path):
    c = LLaVAConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=28, patch_size=14),
                    text=TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0),
                    image_token_id=V - 1, template="plain", image_aspect_ratio="crop")
    (tmp_path / "config.json").write_text(json.dumps(checkpoint.config_to_hf(c)))
    hf = transformers.LlavaConfig.from_pretrained(tmp_path)
    assert hf.text_config.rope_parameters["rope_theta"] == 500.0 and hf.image_token_id == V - 1
    hf.save_pretrained(tmp_path)                          # what transformers writes back reads the same
    assert checkpoint.read_llava_hf_config(json.loads((tmp_path / "config.json").read_text()), "c.json") == c
