"""The loading boundary: what a checkpoint's config says is either implemented or refused with the
file, the key and the value; the conversation template comes from the checkpoint; padding never
indexes past the embedding.

Each refusal plants one value into the config.json of a tiny transformers-saved LLaVA. Where
nanollava implements a key (Mistral's sliding window, a tied lm_head that the file stores anyway),
transformers is the oracle.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from nanollava import LLaVA, checkpoint  # noqa: E402

V = 64


def hf_llava(text_config=None, tied=False, seed=0):
    """A random-weight transformers LlavaForConditionalGeneration (eager, float32)."""
    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=8)
    tc = text_config or transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=40,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 rms_norm_eps=1e-5, tie_word_embeddings=tied)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=V - 1, tie_word_embeddings=tied)).eval()
    for c in (hf.config, hf.config.text_config, hf.config.vision_config):
        c._attn_implementation = "eager"
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    hf_llava().save_pretrained(d)
    return str(d)


def planted(saved, tmp_path, edit):
    """A copy of `saved` whose config.json went through edit(config)."""
    config = json.load(open(os.path.join(saved, "config.json")))
    edit(config)
    out = tmp_path / "planted"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(saved, "model.safetensors"), out / "model.safetensors")
    return str(out)


def set_text(key, value):
    return lambda c: c["text_config"].__setitem__(key, value)


def set_vision(key, value):
    return lambda c: c["vision_config"].__setitem__(key, value)


def set_top(key, value):
    return lambda c: c.__setitem__(key, value)


REFUSED = [  # (edit, the key and value the message must name)
    (set_text("model_type", "gemma"), "model_type = 'gemma'"),          # a LLaVA on Gemma
    (set_text("model_type", "granite"), "model_type = 'granite'"),      # a LLaVA on Granite
    (set_text("hidden_act", "gelu_pytorch_tanh"), "hidden_act = 'gelu_pytorch_tanh'"),
    (set_text("mlp_bias", True), "mlp_bias = True"),
    (set_text("rope_scaling", {"rope_type": "llama3", "factor": 8.0}), "rope_scaling type = 'llama3'"),
    (set_text("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_scaling type = 'linear'"),
    (set_vision("model_type", "dinov2"), "model_type = 'dinov2'"),
    (set_vision("hidden_act", "relu"), "hidden_act = 'relu'"),
    (set_top("model_type", "llava_next_video"), "model_type = 'llava_next_video'"),
    (set_top("projector_hidden_act", "relu"), "projector_hidden_act = 'relu'"),
    (set_top("multimodal_projector_bias", False), "multimodal_projector_bias = False"),
    (set_top("vision_feature_select_strategy", "cls"), "vision_feature_select_strategy = 'cls'"),
    (set_top("vision_feature_layer", -5), "vision_feature_layer = -5 is out of range"),
    (set_top("projector_type", "mlp3x_gelu"), "projector_type = 'mlp3x_gelu'"),
    (set_top("template", "chatml"), "template = 'chatml'"),
]


@pytest.mark.parametrize("edit,named", REFUSED, ids=[n.split(" =")[0] + ":" + n.split("= ")[-1][:20]
                                                     for _, n in REFUSED])
def test_unimplemented_config_values_are_refused_naming_file_key_and_value(saved, tmp_path, edit, named):
    d = planted(saved, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        LLaVA.from_pretrained(d)
    msg = str(e.value)
    assert msg.startswith(os.path.join(d, "config.json") + ": ") and named in msg and "\n" not in msg, msg


ORIGINAL = dict(architectures=["LlavaLlamaForCausalLM"], model_type="llava", vocab_size=V, hidden_size=16,
                intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                mm_vision_tower="clip", mm_projector_type="mlp2x_gelu", mm_hidden_size=16,
                mm_vision_select_layer=-2, mm_use_im_start_end=False, image_aspect_ratio="pad")


@pytest.mark.parametrize("key,value,named", [
    ("mm_use_im_start_end", True, "mm_use_im_start_end = True"),
    ("mm_projector_type", "mlp3x_gelu", "mm_projector_type = 'mlp3x_gelu'"),
    ("mm_vision_select_feature", "cls", "mm_vision_select_feature = 'cls'"),
    ("mm_resampler_type", "spatial_pool", "mm_resampler_type = 'spatial_pool'"),
    ("model_type", "llava_mpt", "model_type = 'llava_mpt'"),
    ("image_aspect_ratio", "resize", "image_aspect_ratio = 'resize'"),
    ("mm_patch_merge_type", "spatial", "mm_patch_merge_type = 'spatial'"),
])
def test_unimplemented_original_llava_config_values_are_refused(tmp_path, key, value, named):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(dict(model_type="clip_vision_model", hidden_size=16)))
    config = dict(ORIGINAL, **{key: value})
    if key == "mm_patch_merge_type":
        config["image_aspect_ratio"] = "anyres"
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"lm_head.weight": torch.zeros(V, 16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        LLaVA.from_pretrained(str(tmp_path), vision_tower=str(tmp_path / "clip"))
    assert str(e.value).startswith(str(tmp_path / "config.json") + ": ") and named in str(e.value), str(e.value)


def test_int64_and_nan_weights_are_refused_naming_file_and_key(saved, tmp_path):
    state = load_file(os.path.join(saved, "model.safetensors"))
    key = next(k for k in state if k.endswith("layers.0.mlp.up_proj.weight"))
    for name, bad in (("int", state[key].to(torch.int64)), ("nan", state[key].clone().fill_(float("nan")))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(open(os.path.join(saved, "config.json")).read())
        save_file({**state, key: bad}, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=rf"model.safetensors: {key}.* (has dtype torch.int64|holds NaN)"):
            LLaVA.from_pretrained(str(d))


# ----------------------------------------------------------------------------- implemented, against transformers

def logits_of(model_or_hf, ids, pixels):
    with torch.no_grad():
        out = model_or_hf(input_ids=ids, pixel_values=pixels) if hasattr(model_or_hf, "generation_config") \
            else model_or_hf(ids, pixel_values=pixels)
    return out.logits if hasattr(out, "logits") else out


def image_prompt(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V - 1, (1, T), generator=g)
    ids[0, 1:5] = V - 1                                           # one 16 px image: 2 x 2 = 4 tokens
    return ids, torch.randn(1, 3, 16, 16, generator=g)


def test_mistral_sliding_window_runs_within_the_window_and_refuses_past_it(tmp_path):
    """Mistral's sliding window equals full causal attention on sequences that fit in it."""
    tc = transformers.MistralConfig(vocab_size=V, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                    sliding_window=12, max_position_embeddings=64)
    hf = hf_llava(text_config=tc)
    hf.save_pretrained(tmp_path)
    model = LLaVA.from_pretrained(str(tmp_path))
    assert model.config.text.sliding_window == 12 and model.config.text.context_length == 12
    ids, pixels = image_prompt(12)
    torch.testing.assert_close(logits_of(model, ids, pixels), logits_of(hf, ids, pixels), rtol=1e-4, atol=1e-4)
    ids, pixels = image_prompt(13)
    with pytest.raises(ValueError, match="13 tokens is longer than this model's context of 12"):
        logits_of(model, ids, pixels)


@pytest.mark.parametrize("distinct", [True, False])
def test_tied_config_with_an_lm_head_in_the_file_loads_like_transformers(tmp_path, distinct):
    """transformers: tie_word_embeddings with a stored lm_head that differs -> untied, the stored one;
    one that equals the embedding -> tied."""
    hf_llava(tied=True).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    emb = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    state["lm_head.weight"] = torch.randn_like(emb) if distinct else emb.clone()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = LLaVA.from_pretrained(str(tmp_path))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (model.language_model.lm_head is None) == (not distinct) == model.config.text.tie_word_embeddings
    ids, pixels = image_prompt(9)
    torch.testing.assert_close(logits_of(model, ids, pixels), logits_of(hf, ids, pixels), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the template is part of the checkpoint

@pytest.mark.parametrize("file,text,template", [
    ("chat_template.json", json.dumps({"chat_template": "{{ 'USER: ' }}...{{ 'ASSISTANT:' }}"}), "vicuna_v1"),
    ("chat_template.jinja", "{{ '[INST] ' }}{{ content['text'] }}{{' [/INST]' }}", "mistral_instruct"),
    ("tokenizer_config.json", json.dumps({"chat_template": "{{ '<|im_start|>' + message['role'] }}"}),
     "chatml_direct"),
    ("tokenizer.json", json.dumps({"added_tokens": [{"id": 9, "content": "<|start_header_id|>"}]}), "llava_llama_3"),
    (None, None, None),
])
def test_template_comes_from_the_checkpoints_tokenizer_files(saved, tmp_path, file, text, template):
    d = planted(saved, tmp_path, lambda c: None)
    if file:
        open(os.path.join(d, file), "w").write(text)
    assert LLaVA.from_pretrained(d).config.template == template
    assert LLaVA.from_pretrained(d, template="llava_v1").config.template == "llava_v1"     # the override wins
    with pytest.raises(ValueError, match="template = 'vicuna'"):
        LLaVA.from_pretrained(d, template="vicuna")


def test_template_of_nanollava_and_original_checkpoints(saved, tmp_path):
    d = planted(saved, tmp_path, set_top("template", "chatml_direct"))
    open(os.path.join(d, "chat_template.jinja"), "w").write("[INST]")
    assert LLaVA.from_pretrained(d).config.template == "chatml_direct", "nanollava's own key wins"
    read = checkpoint.read_original_config
    vision = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    assert read(dict(ORIGINAL, vocab_size=32000), vision, "c").template == "vicuna_v1"         # LLaVA-1.5
    assert read(dict(ORIGINAL, vocab_size=32000, model_type="llava_mistral"), vision, "c").template == \
        "mistral_instruct"                                                                      # v1.6-mistral
    assert read(dict(ORIGINAL, vocab_size=64000), vision, "c").template is None                # 34B: ask its tokenizer


def test_sample_and_eval_say_which_template_and_refuse_without_one(saved, tmp_path, capsys):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import eval as eval_script
    import sample
    from nanollava.tokenizer import train_bpe
    d = planted(saved, tmp_path, lambda c: None)
    tok = train_bpe(["what is it a red circle"], vocab_size=V - 8,       # no <image>: the model's id is used
                    special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<none>"))
    tok.tok.save(os.path.join(d, "tokenizer.json"))
    with pytest.raises(SystemExit, match="does not say which conversation template it uses.*--template"):
        sample.cli(["--model", d, "--prompt", "hi", "--max-new-tokens", "2"])
    sample.cli(["--model", d, "--prompt", "what is it", "--max-new-tokens", "2", "--template", "llava_v1"])
    assert "template: llava_v1 (--template)" in capsys.readouterr().err
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "text": "what is it"}) + "\n")
    with pytest.raises(SystemExit, match="--template"):
        eval_script.cli(["--model", d, "--questions", str(q), "--answers", str(tmp_path / "a.jsonl")])
    open(os.path.join(d, "chat_template.jinja"), "w").write("USER: {{ x }} ASSISTANT:")
    eval_script.cli(["--model", d, "--questions", str(q), "--answers", str(tmp_path / "a.jsonl"),
                     "--max-new-tokens", "2"])
    assert "template: vicuna_v1 (from the checkpoint)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- padding stays inside the embedding

def llava_hf_layout_tokenizer(path):
    """A tokenizer.json laid out like llava-hf's: 32,000 LLaMA tokens, then <image> = 32000 and <pad> = 32001."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    words = ["what", "color", "is", "the", "shape?", "a", "red", "circle", "blue", "square", "describe", "it."]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{"▁" + w: 3 + i for i, w in enumerate(words)}}
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), 32000)})
    t = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    t.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    assert (t.token_to_id("<image>"), t.token_to_id("<pad>")) == (32000, 32001)
    t.save(str(path))
    return str(path)


def test_readme_recipe_with_the_llava_hf_tokenizer_on_a_32000_row_llm_trains_and_batch_generates(tmp_path):
    """Vicuna's 32,000 embedding rows + the llava-hf tokenizer.json (<pad> = 32001): a padded stage-2 batch
    trains and a left-padded eval batch generates; padding (unk, as LLaVA) never indexes past the table."""
    import sys
    from PIL import Image
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import eval as eval_script
    import train
    from nanollava.tokenizer import Tokenizer
    tok_path = llava_hf_layout_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    assert tok.pad_id == tok.unk_id == 0 and tok.image_token_id == 32000
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).save_pretrained(tmp_path / "clip")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=256)).save_pretrained(tmp_path / "vicuna")
    (tmp_path / "images").mkdir()
    records, questions = [], []
    for i, (color, text) in enumerate([("red", "a red circle"), ("blue", "a blue square it."),
                                       ("red", "describe it. a red circle"), ("blue", "a blue square")]):
        Image.new("RGB", (20 + 7 * i, 16), color).save(tmp_path / "images" / f"{i}.png")
        long = " what color is the shape?" * i                     # different lengths: padded batches
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?" + long}, {"from": "gpt", "value": text}]})
        questions.append({"question_id": i, "image": f"{i}.png", "text": "what color is the shape?" + long})
    (tmp_path / "data.json").write_text(json.dumps(records))
    common = ["--vision-tower", str(tmp_path / "clip"), "--llm", str(tmp_path / "vicuna"), "--tokenizer", tok_path,
              "--data", str(tmp_path / "data.json"), "--image-folder", str(tmp_path / "images"),
              "--global-batch", "4", "--micro-batch", "2", "--device", "cpu", "--max-steps", "1"]
    train.main(["--stage", "1", "--out", str(tmp_path / "s1"), *common])
    train.main(["--stage", "2", "--out", str(tmp_path / "s2"), "--stage1-out", str(tmp_path / "s1"), *common])
    final = tmp_path / "s2" / "final"
    assert LLaVA.from_pretrained(str(final)).language_model.model.embed_tokens.num_embeddings == 32000
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    eval_script.cli(["--model", str(final), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
                     str(tmp_path / "images"), "--answers", str(tmp_path / "a.jsonl"), "--batch-size", "4",
                     "--max-new-tokens", "6"])
    answers = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert len(answers) == 4 and not any("error" in a for a in answers)
