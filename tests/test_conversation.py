"""Conversation templates and label masking: prompt strings equal to the official `conversation.py`
(golden strings produced by LLaVA-NeXT's own code), labels equal to the official `preprocess_v1`,
`preprocess_plain`, `preprocess_llama_2`, `preprocess_mpt` and `preprocess_llama3` (reimplemented
below, on tokenizers trained here, HF-style: special-token strings in the prompt are parsed)."""
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanollava import conversation
from nanollava.conversation import IGNORE_INDEX, SHORT_ANSWER
from nanollava.tokenizer import Tokenizer, train_bpe

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = ["what", "color", "is", "the", "shape", "circle", "red", "blue", "yes", "no", "a", "of",
         "image", "there", "triangle?", "Describe", "briefly.", "It", "is,", "green.", "2", "cat's"]
CORPUS = [conversation.SYSTEM_USER, conversation.SYSTEM_HUMAN, "USER: ASSISTANT:",
          SHORT_ANSWER, " ".join(WORDS), "\n".join(WORDS)]

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                "gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def toks(tok):
    """Two ways LLaMA tokenizers put the "▁" prefix: a Metaspace pre-tokenizer (our toy) and the
    llava-hf tokenizer.json layout (normalizer Prepend("▁") + Replace(" ", "▁"), applied to each
    piece between special tokens, i.e. the legacy behaviour); words never merge across "▁"."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    t = HFTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"], show_progress=False))
    return {"metaspace": tok, "llama_normalizer": Tokenizer(t)}


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


# --- the original LLaVA algorithm (llava/mm_utils.py, llava/train/train.py), legacy tokenizer ---

@functools.lru_cache(maxsize=None)
def _hf_style(tok):
    """The same tokenizer.json, with HF's behaviour: special-token strings in text are special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    return HFTokenizer.from_str(tok.tok.to_str())


def hf_tokenize(text, tok):
    """transformers' `tokenizer(text).input_ids` for a LLaMA tokenizer: bos, then the text."""
    return [tok.bos_id] + _hf_style(tok).encode(text, add_special_tokens=False).ids


def orig_tokenizer_image_token(prompt, tok, image_id):
    chunks = [hf_tokenize(c, tok) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for k, c in enumerate(chunks):
        if k:
            ids.append(image_id)
        ids.extend(c[1:])
    return ids


def orig_preprocess_multimodal(values):
    return [("<image>\n" + v.replace("<image>", "").strip()) if "<image>" in v else v for v in values]


def orig_preprocess_v1(messages, tok, system):
    values = orig_preprocess_multimodal([m["value"] for m in messages])
    prompt = system + " "
    for k, v in enumerate(values):
        prompt += ("USER: " + v + " ") if k % 2 == 0 else ("ASSISTANT: " + v + "</s>")
    img = tok.image_token_id
    ids = orig_tokenizer_image_token(prompt, tok, img)
    target = list(ids)
    total_len, cur_len = len(ids), 1
    target[:1] = [IGNORE_INDEX]
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len = len(orig_tokenizer_image_token(rou, tok, img))
        instruction_len = len(orig_tokenizer_image_token(parts[0], tok, img)) - 2
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    mismatch = cur_len != total_len
    return ids, target, mismatch


def next_preprocess_multimodal(values):
    """LLaVA-NeXT's preprocess_multimodal: a turn with exactly one <image> not at its start gets it moved to
    its start; a turn with several keeps them where they are."""
    return [("<image>\n" + v.replace("<image>", "").strip()).strip() if v.count("<image>") == 1
            and not v.startswith("<image>") else v for v in values]


def orig_preprocess_plain(messages, tok):
    prompt = "<image>" + messages[1]["value"] + "\n"
    ids = orig_tokenizer_image_token(prompt, tok, tok.image_token_id)
    n = len(orig_tokenizer_image_token("<image>", tok, tok.image_token_id))
    return ids, [IGNORE_INDEX] * n + ids[n:]


def expand(ids, labels, image_id, n):
    """One placeholder per image (original) -> n copies (HF convention)."""
    out_i, out_l = [], []
    for i, lab in zip(ids, labels):
        k = n if i == image_id else 1
        out_i += [i] * k
        out_l += [lab] * k
    return out_i, out_l


# --- strategies ---

text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
multiline = st.lists(text, min_size=1, max_size=2).map("\n".join)


@st.composite
def conversations(draw, with_image=None):
    n_rounds = draw(st.integers(1, 3))
    msgs = []
    for _ in range(n_rounds):
        msgs += [human(draw(multiline)), gpt(draw(text))]
    if with_image is None:
        with_image = draw(st.booleans())
    if with_image:
        where = draw(st.sampled_from(["start", "end"]))
        v = msgs[0]["value"]
        msgs[0]["value"] = "<image>\n" + v if where == "start" else v + "\n<image>"
    return msgs


# --- prompt strings (docs/llava.md §2) ---

def test_vicuna_v1_prompt_string_is_exact():
    msgs = [human("<image>\nWhat is it?"), gpt("A cat."), human("Color?"), gpt("Gray.")]
    assert conversation.prompt(msgs, "vicuna_v1") == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Gray.</s>")


def test_llava_v1_prompt_says_human():
    msgs = [human("Hi"), gpt("Hello.")]
    assert conversation.prompt(msgs, "llava_v1") == LLAVA_SYSTEM + " USER: Hi ASSISTANT: Hello.</s>"


def test_generation_prompt_string_ends_with_assistant_colon_no_space():
    msgs = [human("What is it?\n<image>")]
    p = conversation.prompt(msgs, "vicuna_v1")
    assert p == VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"


def test_plain_prompt_is_image_caption_newline():
    msgs = [human("<image>\nDescribe the image."), gpt("a red circle.")]
    assert conversation.prompt(msgs, "plain") == "<image>a red circle.\n"


def test_response_format_constants_match_paper():
    assert conversation.SHORT_ANSWER == "Answer the question using a single word or phrase."
    assert conversation.MULTIPLE_CHOICE == "Answer with the option's letter from the given choices directly."


# --- labels ---

@SETTINGS
@given(msgs=conversations(), n_img=st.integers(1, 5), template=st.sampled_from(["vicuna_v1", "llava_v1"]))
def test_labels_supervise_exactly_the_replies_and_eos(tok, msgs, n_img, template):
    ids, labels = conversation.tokenize(msgs, tok, template, num_image_tokens=n_img)
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX
    sup = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    replies = [m["value"] for m in msgs if m["from"] == "gpt"]
    assert len(sup) == sum(len(tok.encode(r)) + 1 for r in replies), "supervised token count"
    # split the supervised stream at </s>: each piece decodes to one reply
    pieces, cur = [], []
    for i in sup:
        if i == tok.eos_id:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert cur == [] and pieces == replies
    n_tags = sum("<image>" in m["value"] for m in msgs)
    assert ids.count(tok.image_token_id) == n_tags * n_img
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == tok.image_token_id)


@SETTINGS
@given(msgs=conversations(), n_img=st.integers(1, 4), template=st.sampled_from(["vicuna_v1", "llava_v1"]),
       which=st.sampled_from(["metaspace", "llama_normalizer"]))
def test_labels_agree_with_original_preprocess_v1(toks, msgs, n_img, template, which):
    tok = toks[which]
    ids, labels = conversation.tokenize(msgs, tok, template, num_image_tokens=n_img)
    o_ids, o_labels, mismatch = orig_preprocess_v1(msgs, tok, conversation.TEMPLATES[template].system.strip())
    assert not mismatch, "the original hit 'tokenization mismatch' on this tokenizer"
    o_ids, o_labels = expand(o_ids, o_labels, tok.image_token_id, n_img)
    assert ids == o_ids
    assert labels == o_labels


@SETTINGS
@given(caption=text, prompt_text=multiline, n_img=st.integers(1, 5),
       which=st.sampled_from(["metaspace", "llama_normalizer"]))
def test_plain_agrees_with_original_preprocess_plain(toks, caption, prompt_text, n_img, which):
    tok = toks[which]
    msgs = [human("<image>\n" + prompt_text), gpt(caption)]
    ids, labels = conversation.tokenize(msgs, tok, "plain", num_image_tokens=n_img)
    o_ids, o_labels = expand(*orig_preprocess_plain(msgs, tok), tok.image_token_id, n_img)
    assert ids == o_ids and labels == o_labels
    assert ids == [tok.bos_id] + [tok.image_token_id] * n_img + tok.encode(caption + "\n")
    assert tok.eos_id not in ids, "plain has no EOS"
    assert [lab for lab in labels if lab != IGNORE_INDEX] == tok.encode(caption + "\n")


@SETTINGS
@given(msgs=conversations(), n_img=st.integers(1, 3))
def test_generation_prompt_is_a_prefix_of_the_training_ids(tok, msgs, n_img):
    ids, labels = conversation.tokenize(msgs, tok, "vicuna_v1", num_image_tokens=n_img)
    gen = conversation.generation_prompt(msgs[:-1], tok, "vicuna_v1", num_image_tokens=n_img)
    assert ids[:len(gen)] == gen
    k = len(tok.encode("ASSISTANT:"))
    assert gen[-k:] == tok.encode("ASSISTANT:")
    assert all(lab == IGNORE_INDEX for lab in labels[len(gen) - k:len(gen)])
    assert labels[len(gen)] != IGNORE_INDEX, "the reply starts right after the prompt"


def test_single_image_moves_to_start_of_first_turn(tok):
    a = conversation.tokenize([human("What is it? <image>"), gpt("a cat")], tok, num_image_tokens=2)
    b = conversation.tokenize([human("<image>\nWhat is it?"), gpt("a cat")], tok, num_image_tokens=2)
    assert a == b
    later = [human("Hi"), gpt("yes"), human(" <image> What is it?"), gpt("a cat")]
    assert conversation.prompt(later).startswith(VICUNA_SYSTEM + " USER: <image>\nHi ASSISTANT: yes</s>"
                                                 "USER: What is it? ASSISTANT:")


def test_several_images_take_a_count_each_and_stay_in_place(tok):
    msgs = [human("<image> left <image> right"), gpt("two")]
    ids, _ = conversation.tokenize(msgs, tok, num_image_tokens=[2, 3])
    img = tok.image_token_id
    runs = "".join("I" if i == img else "." for i in ids).split(".")
    assert [len(r) for r in runs if r] == [2, 3]
    assert "USER: <image> left <image> right ASSISTANT:" in conversation.prompt(msgs)
    with pytest.raises(ValueError, match="2 <image> tags but 1"):
        conversation.tokenize(msgs, tok, num_image_tokens=[2])


def test_text_only_conversation_has_no_image_tokens(tok):
    ids, _ = conversation.tokenize([human("hello"), gpt("yes")], tok, num_image_tokens=576)
    assert tok.image_token_id not in ids


@pytest.mark.parametrize("msgs, match", [
    ([gpt("hi"), human("yo")], "alternate"),
    ([human("a"), human("b")], "alternate"),
    ([human("a")], "end with a gpt reply"),
    ([], "non-empty"),
    ([{"from": "human"}], "string 'value'"),
    ([human("a"), gpt("<image> b")], "<image> in an assistant reply"),
])
def test_malformed_conversations_raise_clear_errors(tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        conversation.tokenize(msgs, tok)


def test_plain_takes_exactly_one_caption_turn(tok):
    with pytest.raises(ValueError, match="one human turn and one caption"):
        conversation.tokenize([human("<image>"), gpt("a"), human("b"), gpt("c")], tok, "plain")


def test_unknown_template_lists_the_supported_ones(tok):
    with pytest.raises(ValueError, match="plain"):
        conversation.tokenize([human("a"), gpt("b")], tok, template="chatml")


def test_tokenizer_encode_adds_no_special_tokens_unless_asked(tok, tmp_path):
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.unk_id == 0
    ids = tok.encode("what color")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.encode("what color", bos=True) == [tok.bos_id] + ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "what color"
    path = tmp_path / "tokenizer.json"
    tok.tok.save(str(path))
    again = Tokenizer.from_file(str(path))
    assert again.encode("what color") == ids and again.image_token_id == tok.image_token_id
    assert len(again) == len(tok)


def test_tokenizer_without_pad_pads_with_unk(tmp_path):
    t = train_bpe(CORPUS, vocab_size=200, special_tokens=("<unk>", "<s>", "</s>", "<x>", "<y>"))
    path = tmp_path / "t.json"
    t.tok.save(str(path))
    t = Tokenizer.from_file(str(path))
    assert t.pad_id == t.unk_id == 0
    with pytest.raises(ValueError, match="<image>"):
        t.image_token_id


def test_tokenizer_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.from_file(str(bad))


# --- LLaVA-NeXT templates: golden prompts, and labels against the official preprocess_* ---

# LLaVA-NeXT `llava/conversation.py`, `conv_templates[name].get_prompt()` on GOLDEN_MESSAGES, run from
# that repository (its llava_llama_3 renders Meta-Llama-3-8B-Instruct's chat template):
# (whole conversation, generation prompt = the conversation without its last reply).
GOLDEN_MESSAGES = [human("<image>\nWhat is in the image?"), gpt("A red circle."), human("How many sides?"),
                   gpt("None.")]
GOLDEN = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
        "A red circle.</s>USER: How many sides? ASSISTANT: None.</s>",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
        "A red circle.</s>USER: How many sides? ASSISTANT:"),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
        "A red circle.</s>USER: How many sides? ASSISTANT: None.</s>",
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
        "A red circle.</s>USER: How many sides? ASSISTANT:"),
    "mistral_instruct": (
        "[INST] <image>\nWhat is in the image? [/INST] A red circle. </s>[INST] How many sides? [/INST] None. </s>",
        "[INST] <image>\nWhat is in the image? [/INST] A red circle. </s>[INST] How many sides? [/INST]"),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nHow many sides?<|im_end|>"
        "<|im_start|>assistant\nNone.<|im_end|>",
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nHow many sides?<|im_end|>"
        "<|im_start|>assistant\n"),
    "llava_llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user "
        "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is in the image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA red circle."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHow many sides?<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\nNone.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user "
        "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is in the image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA red circle."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHow many sides?<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\n"),
    "qwen_1_5": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is in the "
        "image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nHow many sides?"
        "<|im_end|>\n<|im_start|>assistant\nNone.<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is in the "
        "image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nHow many sides?"
        "<|im_end|>\n<|im_start|>assistant\n"),
}
LLAMA3_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize("template", sorted(GOLDEN))
def test_prompt_strings_equal_llava_next_conversation_py(template):
    whole, generation = GOLDEN[template]
    bos = "<|begin_of_text|>" if template == "llava_llama_3" else ""     # a token for nanollava, not text
    if template == "llava_llama_3":
        # get_prompt always ends with the generation header; training (preprocess_llama3) does not
        whole = whole.removesuffix(LLAMA3_HEADER)
    assert bos + conversation.prompt(GOLDEN_MESSAGES, template) == whole
    assert bos + conversation.prompt(GOLDEN_MESSAGES[:-1], template) == generation


SPECIALS = {"chatml_direct": ["<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
            "qwen_1_5": ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<image>"],      # Qwen: no bos
            "llava_llama_3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<image>"]}


@functools.lru_cache(maxsize=None)
def byte_level(template):
    """A byte-level BPE tokenizer (as Llama-3's and Qwen's; no "▁" prefix) with the template's specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = CORPUS + [conversation.SYSTEM_VISION, "system user assistant Answer the questions.\n\n"]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[template],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    bos, eos = SPECIALS[template][:2] if template != "qwen_1_5" else ("<none>", "<|im_end|>")
    return Tokenizer(t, bos=bos, eos=eos)


def orig_preprocess_llama_2(messages, tok):
    """preprocess_llama_2 with conv_mistral_instruct (system "", sep "", sep2 "</s>")."""
    values = next_preprocess_multimodal([m["value"] for m in messages])
    prompt = "".join(f"[INST] {v} [/INST]" if k % 2 == 0 else f" {v} </s>" for k, v in enumerate(values))
    img = tok.image_token_id
    ids = orig_tokenizer_image_token(prompt, tok, img)
    target, cur_len = [IGNORE_INDEX] + ids[1:], 1
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split("[/INST] ")
        if len(parts) != 2:
            break
        parts[0] += "[/INST] "
        round_len = len(orig_tokenizer_image_token(rou, tok, img))
        instruction_len = len(orig_tokenizer_image_token(parts[0], tok, img)) - 2
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    return ids, target, cur_len != len(ids)


def orig_preprocess_mpt(messages, tok):
    """preprocess_mpt with conv_chatml_direct (a tokenizer without the `legacy` flag)."""
    values = next_preprocess_multimodal([m["value"] for m in messages])
    sep, roles = "<|im_end|>", ("<|im_start|>user\n", "<|im_start|>assistant\n")
    prompt = "<|im_start|>system\nAnswer the questions." + sep
    prompt += "".join(roles[k % 2] + v + sep for k, v in enumerate(values))
    img = tok.image_token_id
    ids = orig_tokenizer_image_token(prompt, tok, img)
    target, cur_len = [IGNORE_INDEX] + ids[1:], 1
    rounds = prompt.split(sep)
    re_rounds = [sep.join(rounds[:3])] + [sep.join(rounds[i:i + 2]) for i in range(3, len(rounds), 2)]
    for rou in re_rounds:
        if rou == "":
            break
        parts = rou.split(sep + roles[1])
        if len(parts) != 2:
            break
        parts[0] += sep + roles[1]
        round_len = len(orig_tokenizer_image_token(rou, tok, img))
        instruction_len = len(orig_tokenizer_image_token(parts[0], tok, img)) - 1
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    return ids, target, cur_len != len(ids)


def orig_preprocess_llama3(messages, tok):
    """preprocess_llama3: each turn through transformers' apply_chat_template with Llama-3's template;
    user turns masked, assistant turns supervised, and every <|begin_of_text|>, <|start_header_id|>,
    <|end_header_id|>, <|eot_id|> (and "\\n\\n", which a byte-level vocabulary spells "ĊĊ") unmasked."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=_hf_style(tok), bos_token="<|begin_of_text|>")
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    values = next_preprocess_multimodal([m["value"] for m in messages])
    ids = list(hf.apply_chat_template([{"role": "system", "content": conversation.SYSTEM_VISION}], return_dict=False))
    target = [IGNORE_INDEX] * len(ids)
    for k, v in enumerate(values):
        role = ("user", "assistant")[k % 2]
        enc = list(hf.apply_chat_template([{"role": role, "content": v}], return_dict=False))[1:]
        ids += enc
        target += [IGNORE_INDEX] * len(enc) if role == "user" else enc
    unmask = {hf.convert_tokens_to_ids(t) for t in ["<|begin_of_text|>", "<|start_header_id|>",
                                                    "<|end_header_id|>", "<|eot_id|>", "\n\n"]}
    target = [i if i in unmask else lab for i, lab in zip(ids, target)]
    return ids, target, False


def orig_preprocess_qwen(messages, tok):
    """preprocess_qwen: each turn through the chat template it sets, "<|im_start|>{role}\n{content}<|im_end|>\n";
    user turns masked, assistant turns supervised, and every <|im_start|>, <|im_end|> and "\n" (Qwen's id 198;
    here this tokenizer's) unmasked. No bos."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=_hf_style(tok))
    hf.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                        "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                        "{% endif %}")
    values = next_preprocess_multimodal([m["value"] for m in messages])
    ids = list(hf.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."}], return_dict=False))
    target = [IGNORE_INDEX] * len(ids)
    for k, v in enumerate(values):
        role = ("user", "assistant")[k % 2]
        enc = list(hf.apply_chat_template([{"role": role, "content": v}], return_dict=False))
        ids += enc
        target += [IGNORE_INDEX] * len(enc) if role == "user" else enc
    unmask = {hf.convert_tokens_to_ids("<|im_start|>"), hf.convert_tokens_to_ids("<|im_end|>")} | set(hf("\n").input_ids)
    target = [i if i in unmask else lab for i, lab in zip(ids, target)]
    return ids, target, False


ORIGINAL_PREPROCESS = {"mistral_instruct": orig_preprocess_llama_2, "chatml_direct": orig_preprocess_mpt,
                       "llava_llama_3": orig_preprocess_llama3, "qwen_1_5": orig_preprocess_qwen}


@SETTINGS
@given(msgs=conversations(), n_img=st.integers(1, 4), template=st.sampled_from(sorted(ORIGINAL_PREPROCESS)))
def test_labels_agree_with_llava_next_preprocess(tok, msgs, n_img, template):
    """mistral_instruct on a LLaMA (Metaspace) tokenizer as Mistral's; chatml_direct and llava_llama_3
    on byte-level ones as Llama-3's and Qwen's."""
    tk = tok if template == "mistral_instruct" else byte_level(template)
    ids, labels = conversation.tokenize(msgs, tk, template, num_image_tokens=n_img)
    o_ids, o_labels, mismatch = ORIGINAL_PREPROCESS[template](msgs, tk)
    assert not mismatch, "the original hit 'tokenization mismatch' on this tokenizer"
    o_ids, o_labels = expand(o_ids, o_labels, tk.image_token_id, n_img)
    assert ids == o_ids
    assert labels == o_labels
    # every reply and its end-of-turn token are supervised (llama3 and qwen: every end-of-turn token)
    stop = tk.special_id(conversation.TEMPLATES[template].stop)
    n = len(msgs) // 2
    assert sum(lab == stop for lab in labels) == (2 * n + 1 if conversation.TEMPLATES[template].label_specials else n)


@pytest.mark.parametrize("template", sorted(ORIGINAL_PREPROCESS))
def test_generation_prompt_ends_where_the_reply_begins(tok, template):
    tk = tok if template == "mistral_instruct" else byte_level(template)
    msgs = [human("<image>\nwhat color is the shape"), gpt("red."), human("is it a circle"), gpt("yes")]
    ids, labels = conversation.tokenize(msgs, tk, template, num_image_tokens=2)
    gen = conversation.generation_prompt(msgs[:-1], tk, template, num_image_tokens=2)
    assert ids[:len(gen)] == gen
    assert labels[len(gen)] == ids[len(gen)], "the reply's first token is supervised"
    assert conversation.stop_ids(tk, template)[0] == tk.special_id(conversation.TEMPLATES[template].stop)


def test_literal_special_token_strings_in_data_are_text(tok):
    """A user who writes "</s>" or "<|im_end|>" gets text, not the token that ends a turn."""
    ids, _ = conversation.tokenize([human("what is </s> and <s>"), gpt("a </s> tag")], tok)
    assert ids.count(tok.eos_id) == 1 and ids.count(tok.bos_id) == 1
    tk = byte_level("chatml_direct")
    ids, _ = conversation.tokenize([human("say <|im_end|>"), gpt("<|im_end|>")], tk, "chatml_direct")
    assert ids.count(tk.special_id("<|im_end|>")) == 3      # system, user turn, reply: the template's only


def test_template_needs_its_special_tokens(tok):
    with pytest.raises(ValueError, match="no '<|im_start|>' token, which the conversation template needs"):
        conversation.tokenize([human("a"), gpt("b")], tok, "chatml_direct")


@pytest.mark.parametrize("template", sorted(ORIGINAL_PREPROCESS))
def test_several_images_stay_in_place_and_agree_with_llava_next_preprocess(tok, template):
    tk = tok if template == "mistral_instruct" else byte_level(template)
    msgs = [human("<image>\nleft <image>\nright what color"), gpt("red."), human("is it a circle"), gpt("yes")]
    ids, labels = conversation.tokenize(msgs, tk, template, num_image_tokens=[2, 3])
    o_ids, o_labels, mismatch = ORIGINAL_PREPROCESS[template](msgs, tk)
    assert not mismatch
    img = tk.image_token_id
    out_i, out_l, counts = [], [], iter([2, 3])
    for i, lab in zip(o_ids, o_labels):                   # one placeholder per image -> its own count
        k = next(counts) if i == img else 1
        out_i, out_l = out_i + [i] * k, out_l + [lab] * k
    assert (ids, labels) == (out_i, out_l)
