"""Conversation templates and label masking (LLaVA-1.5 paper §3 / original `conversation.py`,
`preprocess_plain`, `preprocess_v1`).

Templates:
  plain      (stage 1) `<s>` + image tokens + caption + "\\n"; only caption + "\\n" supervised, no EOS.
  vicuna_v1  (stage 2, eval) "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."; only the replies
             and their `</s>` are supervised.
  llava_v1   as vicuna_v1 with the system prompt saying "human".

Labels are built constructively, segment by segment, instead of the original's recount of
token lengths (which silently masks a whole sample on "tokenization mismatch").

Segmentation rule (why it matches whole-string tokenization): the prompt is cut only at
special tokens (`<s>`, `</s>`, `<image>`) and at the single space between "ASSISTANT:" and
a reply. Each text segment is encoded on its own, so a LLaMA SentencePiece tokenizer
(Metaspace / legacy prefix "▁") gives it exactly one leading "▁": for a reply that "▁" is the
space after "ASSISTANT:", and for text right after a special token it is the dummy prefix
the legacy slow tokenizer (the one the original LLaVA used) adds after special tokens too. The
masked part of a round therefore ends with "ASSISTANT:" (no trailing space) and the
supervised part is encode(reply) + `</s>`, the same tokens the original supervises.
tests/test_conversation.py checks this against a reimplementation of preprocess_v1 for both
prefix styles (Metaspace pre-tokenizer; llava-hf's Prepend/Replace normalizer). A non-legacy
tokenizer (Metaspace prepend_scheme="first") would give no "▁" after `</s>` when the whole
string is encoded at once; nanollava always encodes per segment, i.e. the legacy tokenization
LLaVA-1.5 was trained with, so training and generation prompts always agree.

Images: a sample with ONE `<image>` has it moved to the start of the first user turn as
"<image>\\n" (original preprocess_multimodal; LLaVA data has it in the first turn anyway).
Samples with several images keep their tags in place (interleaved). Each `<image>` expands into
`num_image_tokens` copies of the image token id (HF convention); for several images
`num_image_tokens` may be a list, one count per image in order.
"""
IGNORE_INDEX = -100
IMAGE_TAG = "<image>"

# Response-format prompts from the LLaVA-1.5 paper (Table 7).
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."

SYSTEMS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "plain": "",
}
TEMPLATES = tuple(SYSTEMS)
ROLES = ("USER", "ASSISTANT")
EOS = "</s>"


def _check(messages, template, for_generation=False):
    if template not in SYSTEMS:
        raise ValueError(f"unknown conversation template {template!r}; supported: {', '.join(TEMPLATES)}")
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversations must be a non-empty list of {'from', 'value'} turns")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise ValueError(f"turn {i} must be a dict with a string 'value', got {m!r:.80}")
        want = "human" if i % 2 == 0 else "gpt"
        if m.get("from") != want:
            raise ValueError(f"turns must alternate human/gpt starting with human; turn {i} is "
                             f"from {m.get('from')!r}, expected {want!r}")
        if want == "gpt" and IMAGE_TAG in m["value"]:
            raise ValueError(f"turn {i}: {IMAGE_TAG} in an assistant reply")
    last = messages[-1]["from"]
    if for_generation and last != "human":
        raise ValueError("a generation prompt must end with a human turn")
    if not for_generation and last != "gpt":
        raise ValueError("a training conversation must end with a gpt reply")


def _move_image(messages):
    """A single `<image>` goes to the start of the first user turn as "<image>\n" (the original
    preprocess_multimodal, which also strips the turn it came from). Several images stay put."""
    values = [m["value"] for m in messages]
    if sum(v.count(IMAGE_TAG) for v in values) != 1:
        return values
    k = next(i for i, v in enumerate(values) if IMAGE_TAG in v)
    values[k] = values[k].replace(IMAGE_TAG, "").strip()
    values[0] = IMAGE_TAG + "\n" + values[0]
    return values


def _segments(messages, template, for_generation=False):
    """The prompt as a list of (text, supervised) pieces; special tokens are pieces of their own.

    Text pieces may contain `<image>` (expanded later). "" pieces never occur.
    """
    _check(messages, template, for_generation)
    values = _move_image(messages)
    if template == "plain":
        if len(values) > 2:
            raise ValueError(f"the plain template takes one human turn and one caption, got {len(values)} turns")
        # stage 1: the human turn is replaced by its image(s) alone (preprocess_plain).
        images = IMAGE_TAG * values[0].count(IMAGE_TAG)
        segs = [("<s>", False)] + ([(images, False)] if images else [])
        if not for_generation:
            segs.append((values[1] + "\n", True))
        return segs
    segs = [("<s>", False)]
    prefix = SYSTEMS[template] + " "
    for i in range(0, len(values), 2):
        segs.append((f"{prefix}{ROLES[0]}: {values[i]} {ROLES[1]}:", False))
        prefix = ""
        if i + 1 < len(values):
            segs.append((values[i + 1], True))
            segs.append((EOS, True))
    return segs


def prompt(messages, template="vicuna_v1"):
    """The exact prompt string (REFERENCE §2), without `<s>` (a token, not text).

    vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."; when the last turn is human the
    string ends with "ASSISTANT:" (the generation prompt). plain: "<image>{caption}\n".
    """
    last = messages[-1] if isinstance(messages, list) and messages else None
    for_generation = isinstance(last, dict) and last.get("from") == "human"
    out = ""
    for text, sup in _segments(messages, template, for_generation)[1:]:
        if sup and text != EOS and template != "plain":
            out += " "                     # the space between "ASSISTANT:" and the reply
        out += text
    return out


def _encode_text(text, tok, image_counts):
    """Encode a text piece, splitting at `<image>` tags (tokenizer_image_token in the original);
    each tag becomes next(image_counts) copies of the image token id."""
    ids = []
    chunks = text.split(IMAGE_TAG)
    for j, chunk in enumerate(chunks):
        if chunk:
            ids += tok.encode(chunk)
        if j < len(chunks) - 1:
            ids += [tok.image_token_id] * next(image_counts)
    return ids


def _image_counts(messages, num_image_tokens):
    n_tags = sum(m["value"].count(IMAGE_TAG) for m in messages if isinstance(m, dict)
                 and isinstance(m.get("value"), str))
    if isinstance(num_image_tokens, int):
        return [num_image_tokens] * n_tags
    counts = list(num_image_tokens)
    if len(counts) != n_tags:
        raise ValueError(f"conversation has {n_tags} {IMAGE_TAG} tags but {len(counts)} "
                         "num_image_tokens entries were given")
    return counts


def _build(messages, tok, template, num_image_tokens, for_generation):
    counts = iter(_image_counts(messages, num_image_tokens))
    ids, labels = [], []
    for text, sup in _segments(messages, template, for_generation):
        if text == "<s>":
            piece = [tok.bos_id]
        elif text == EOS:
            piece = [tok.eos_id]
        else:
            piece = _encode_text(text, tok, counts)
        ids += piece
        labels += piece if sup else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize(messages, tokenizer, template="vicuna_v1", num_image_tokens=576):
    """(input_ids, labels) for a training conversation; labels are -100 outside assistant replies.

    messages: LLaVA JSON `conversations`, [{"from": "human"|"gpt", "value": str}, ...],
    alternating and ending with a gpt reply. num_image_tokens: int, or one int per `<image>`.
    """
    return _build(messages, tokenizer, template, num_image_tokens, for_generation=False)


def generation_prompt(messages, tokenizer, template="vicuna_v1", num_image_tokens=576):
    """Prompt ids for sampling/eval: the conversation so far (ending with a human turn) followed
    by "ASSISTANT:" with no trailing space (plain: `<s>` + image tokens)."""
    return _build(messages, tokenizer, template, num_image_tokens, for_generation=True)[0]
