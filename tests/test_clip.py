"""CLIP vision tower parity with HF transformers' CLIPVisionModel (the oracle), in float32."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanollava import checkpoint
from nanollava.clip import CLIPVisionTower
from nanollava.config import VisionConfig

transformers = pytest.importorskip("transformers")


def tolerance(ref):
    return 1e-4 * max(1.0, ref.abs().max().item())


def hf_and_nano(**kw):
    """A random-weight HF CLIPVisionModel and a nanollava tower holding the same weights."""
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)).eval()
    nano = CLIPVisionTower(checkpoint.read_vision_config(hf.config.to_dict(), "hf")).eval()
    # transformers 5 drops the `vision_model.` segment from CLIPVisionModel.state_dict()
    state = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in hf.state_dict().items()}
    nano.load_state_dict(state, strict=True)
    return hf, nano


@settings(max_examples=10, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), n_layers=st.integers(1, 3),
       grid=st.integers(1, 3), patch=st.sampled_from([4, 7]), data=st.data())
def test_selected_layer_matches_hf_hidden_states(heads, head_dim, n_layers, grid, patch, data):
    torch.manual_seed(0)
    hidden = heads * head_dim
    hf, nano = hf_and_nano(hidden_size=hidden, intermediate_size=2 * hidden + 4, num_hidden_layers=n_layers,
                           num_attention_heads=heads, image_size=grid * patch, patch_size=patch)
    layer = data.draw(st.integers(-(n_layers + 1), n_layers), label="feature_layer")
    strategy = data.draw(st.sampled_from(["default", "full"]), label="strategy")
    x = torch.randn(2, 3, grid * patch, grid * patch)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states[layer]
        ref = ref[:, 1:] if strategy == "default" else ref
        out = nano(x, layer, strategy)
    assert out.shape == ref.shape == (2, grid * grid + (strategy == "full"), hidden)
    assert (out - ref).abs().max() <= tolerance(ref)


def test_feature_layer_list_concatenates_layers_like_hf():
    torch.manual_seed(0)
    hf, nano = hf_and_nano(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                           image_size=12, patch_size=4)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        hs = hf(x, output_hidden_states=True).hidden_states
        ref = torch.cat([hs[i][:, 1:] for i in (-3, 1, -2)], dim=-1)
        out = nano(x, [-3, 1, -2], "default")
    assert out.shape == (3, 9, 48)
    assert (out - ref).abs().max() <= tolerance(ref)


def test_blocks_after_the_selected_layer_never_run():
    torch.manual_seed(0)
    _, nano = hf_and_nano(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                          image_size=8, patch_size=4)
    ran = []
    for i, block in enumerate(nano.vision_model.encoder.layers):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    nano(torch.randn(1, 3, 8, 8), -2)
    assert ran == [0, 1], f"layer -2 of a 3-block tower needs blocks 0 and 1 only, ran {ran}"


def test_wrong_image_size_is_a_clear_error():
    nano = CLIPVisionTower(VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=8, patch_size=4))
    with pytest.raises(ValueError, match="patches"):
        nano(torch.randn(1, 3, 12, 12))


def test_vision_config_from_full_clip_model_config():
    d = transformers.CLIPConfig(vision_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                   image_size=56, patch_size=14)).to_dict()
    c = checkpoint.read_vision_config(d, "c.json")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.image_size, c.patch_size) == (64, 3, 4, 56, 14)
    assert c.hidden_act == "quick_gelu" and c.intermediate_size == 3072   # HF class default when absent


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    _, nano = hf_and_nano(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                          image_size=8, patch_size=4)
    nano.train()
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for flag in (False, True):
        nano.gradient_checkpointing = flag
        nano.zero_grad()
        nano(x, -2).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in nano.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
