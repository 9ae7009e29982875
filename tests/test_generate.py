"""LLaVA forward/loss and KV-cache decoding against HF transformers (LlamaForCausalLM.generate and
LlavaForConditionalGeneration.generate, do_sample=False), token for token, in float32."""
import json

import pytest
import torch

from nanollava import LLaVA, LLaVAConfig, TextConfig, VisionConfig, checkpoint
from nanollava.generate import generate, stream
from nanollava.llava import num_image_tokens
from nanollava.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")

V = 67
IMG = V - 1          # image placeholder id (inside the vocab, as in llava-hf)
N_IMG_TOKENS = 4     # 8x8 image, 4x4 patches, CLS dropped


def assert_close(out, ref, what="logits"):
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{what} differ from HF by {err:.3g} (tolerance {tol:.3g})"


def tiny_config(**kw):
    return LLaVAConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                            image_size=8, patch_size=4),
        text=TextConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0, eos_token_id=None,
                        pad_token_id=0),
        image_token_id=IMG, **kw)


def hf_to_nano_key(k):
    """transformers 5 LlavaForConditionalGeneration.state_dict() key -> llava-hf Hub key (= nanollava's)."""
    for old, new in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


def hf_llava_and_nano(**kw):
    torch.manual_seed(0)
    config = tiny_config(**kw)
    hf_config = transformers.LlavaConfig.from_dict(checkpoint.config_to_hf(config))
    hf_config.text_config._attn_implementation = "eager"
    hf = transformers.LlavaForConditionalGeneration(hf_config).eval()
    nano = LLaVA(config).eval()
    nano.load_state_dict({hf_to_nano_key(k): v for k, v in hf.state_dict().items()}, strict=True)
    return hf, nano


def prompts_with_images(image_counts, text_len=5):
    """Left-padded batch: row b = some text, then image_counts[b] images' placeholders, then text."""
    rows = []
    for n in image_counts:
        ids = torch.randint(1, V - 1, (text_len,)).tolist()
        for _ in range(n):
            ids += [IMG] * N_IMG_TOKENS + torch.randint(1, V - 1, (2,)).tolist()
        rows.append(ids)
    T = max(map(len, rows))
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, T - len(ids):] = torch.tensor(ids)
        mask[b, T - len(ids):] = 1
    pixels = torch.randn(sum(image_counts), 3, 8, 8)
    return input_ids, mask, pixels


def test_llava_logits_and_loss_match_hf_with_several_images_and_text_only_rows():
    hf, nano = hf_llava_and_nano()
    ids, mask, pixels = prompts_with_images([2, 0, 1])
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)   # a token after padding is predicted from padding
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
        out = nano(ids, pixel_values=pixels, attention_mask=mask)
        loss = nano.loss(ids, labels, pixel_values=pixels, attention_mask=mask)
    real = mask.bool()
    assert_close(out[real], ref.logits[real])
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, ref.loss.item())


def test_llava_text_only_batch_and_mismatched_placeholders():
    _, nano = hf_llava_and_nano()
    ids = torch.randint(1, V - 1, (2, 6))
    assert nano(ids).shape == (2, 6, V)
    ids, _, pixels = prompts_with_images([1, 1])
    with pytest.raises(ValueError, match=f"input_ids has {2 * N_IMG_TOKENS} image tokens but the 1 images give "
                                         f"{N_IMG_TOKENS} features"):
        nano(ids, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="image tokens but no pixel values"):
        nano(ids)


def test_llava_full_strategy_and_linear_projector_token_counts():
    torch.manual_seed(0)
    for kw, n_tokens, has_linear_2 in ((dict(vision_feature_select_strategy="full"), N_IMG_TOKENS + 1, True),
                                       (dict(projector_type="linear"), N_IMG_TOKENS, False)):
        model = LLaVA(tiny_config(**kw))
        assert num_image_tokens(model.config, (8, 8)) == n_tokens
        assert [f.shape for f in model.encode_images(torch.randn(2, 3, 8, 8))] == [(n_tokens, 32)] * 2
        assert ("multi_modal_projector.linear_2.weight" in model.state_dict()) == has_linear_2


def test_llava_greedy_generate_matches_hf_batched_and_unbatched():
    hf, nano = hf_llava_and_nano()
    ids, mask, pixels = prompts_with_images([1, 0, 2])
    n = 24
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n,
                          do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    out = generate(nano, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n)
    assert out.shape == (3, n)
    assert torch.equal(out, ref), f"nanollava {out.tolist()}\nHF        {ref.tolist()}"
    first = 0
    for b, n_images in enumerate([1, 0, 2]):      # each row alone, no padding, gives the same tokens
        real = mask[b].bool()
        row_pixels = pixels[first:first + n_images] if n_images else None
        first += n_images
        alone = generate(nano, ids[b][real][None], pixel_values=row_pixels, max_new_tokens=n)
        assert torch.equal(alone[0], out[b]), f"row {b}: batched and unbatched generations differ"


def test_llama_greedy_generate_matches_hf_and_uncached_decoding():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 300.0}, eos_token_id=None,
        pad_token_id=0, attn_implementation="eager")).eval()
    nano = LlamaForCausalLM(checkpoint.read_text_config(hf.config.to_dict(), "hf")).eval()
    nano.load_state_dict(hf.state_dict())
    ids = torch.randint(1, V, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0                  # left padding
    n = 30
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)[:, 7:]
        out = generate(nano, ids, attention_mask=mask, max_new_tokens=n)
        assert torch.equal(out, ref), f"nanollava {out.tolist()}\nHF        {ref.tolist()}"
        seq, m = ids, mask                          # no cache: re-run the whole sequence every step
        for _ in range(n):
            nxt = nano(seq, attention_mask=m)[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq[:, 7:]), "cached and uncached greedy decoding differ"


def test_eos_stops_rows_like_hf():
    hf, nano = hf_llava_and_nano()
    ids, mask, pixels = prompts_with_images([1, 1])
    free = generate(nano, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12)
    eos = int(free[0, 3])                           # a token row 0 emits: make it the eos
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    out = generate(nano, ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out, ref), f"nanollava {out.tolist()}\nHF        {ref.tolist()}"
    assert out.shape[1] <= 12 and (out[0, :4] == free[0, :4]).all()


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    _, nano = hf_llava_and_nano()
    ids = torch.randint(1, V - 1, (2, 5))
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.9)
    a = generate(nano, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = torch.stack(list(stream(nano, ids, generator=torch.Generator().manual_seed(1), **kw)), 1)
    assert torch.equal(a, b)
    greedy = generate(nano, ids, max_new_tokens=10)
    assert torch.equal(generate(nano, ids, max_new_tokens=10, temperature=1.5, top_k=1), greedy)
    assert generate(nano, ids, max_new_tokens=0).shape == (2, 0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    """nanollava's keys are the llava-hf layout: transformers reads save_pretrained output as is."""
    _, nano = hf_llava_and_nano()
    nano.save_pretrained(tmp_path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, pixels = prompts_with_images([1, 2])
    with torch.no_grad():
        assert_close(nano(ids, pixels, attention_mask=mask)[mask.bool()],
                     hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[mask.bool()])
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
