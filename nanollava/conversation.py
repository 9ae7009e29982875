"""Conversation templates and label masking (LLaVA-1.5 paper §3; the formats of LLaVA's and LLaVA-NeXT's
`conversation.py`, the labels of their `preprocess_*`).

A template is the text around each turn (TEMPLATES):
  plain             (stage 1) `<s>` + the image(s) + caption + "\\n"; only caption + "\\n" supervised.
  vicuna_v1         (LLaVA-1.5, v1.6-vicuna) "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
  llava_v1          as vicuna_v1, its system prompt says "human".
  mistral_instruct  (v1.6-mistral) "[INST] {q} [/INST] {a} </s>[INST] ..."
  chatml_direct     (v1.6-34b) "<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n{q}
                    <|im_end|><|im_start|>assistant\\n{a}<|im_end|>..." (no newline between turns)
  llava_llama_3     (llama3-llava-next-8b) the Llama-3 chat format with LLaVA-NeXT's system prompt.
  qwen_1_5          (LLaVA-OneVision, -Interleave, the NeXT ablations) Qwen's chatml: "<|im_start|>system\n
                    You are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n..."
Every reply is supervised up to and including the token that ends it; everything the user or the
template wrote is not (-100), except that llava_llama_3 and qwen_1_5 also supervise every template
special token (qwen_1_5: and every "\n" token), as LLaVA-NeXT's `preprocess_llama3` / `preprocess_qwen` do.

Labels are built constructively instead of the originals' recount of token lengths (which masks a
whole sample, silently, on a "tokenization mismatch"): the prompt is cut at template special tokens
and at `<image>` tags, each text run between them is encoded whole (the legacy LLaMA tokenization
LLaVA-1.5 was trained with: text after a special token gets its own "▁" prefix), and a token is
supervised when its first character belongs to a reply. Special-token strings written by the user
(a literal "</s>" in the data) are plain text, never special tokens.

Images: a conversation with ONE `<image>` has it moved to the start of the first user turn as
"<image>\\n" (the original preprocess_multimodal). Several images keep their tags in place
(interleaved). Each `<image>` expands into num_image_tokens copies of the image token id (HF
convention), one count per image when a list is given.
"""
from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"

# Response-format prompts from the LLaVA-1.5 paper (Table 7).
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Template:
    """The text around each turn; "{}" marks where the message goes."""
    system: str                  # right after bos (unsupervised)
    user: str                    # one user turn, up to where the reply starts (unsupervised)
    reply: str                   # one assistant turn (supervised), with the token that ends it
    generation: str = ""         # what a prompt for generation ends with, after the last user turn
    stop: str = "</s>"           # the token that ends a reply (generation stops on it)
    specials: tuple = ("</s>",)  # template strings that are one special token each
    label_specials: bool = False  # also supervise every template special token (preprocess_llama3, _qwen)
    label_newlines: bool = False  # also supervise every "\n" token (preprocess_qwen)
    strip: bool = False          # trim every message (the Llama-3 chat template's `| trim`)


SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_HUMAN = SYSTEM_USER.replace("user", "human")
SYSTEM_VISION = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural "
                 "language.")
_LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TEMPLATES = {
    "plain": Template("", "{}", "{}\n"),
    "vicuna_v1": Template(SYSTEM_USER + " ", "USER: {} ASSISTANT:", " {}</s>"),
    "llava_v1": Template(SYSTEM_HUMAN + " ", "USER: {} ASSISTANT:", " {}</s>"),
    "mistral_instruct": Template("", "[INST] {} [/INST]", " {} </s>"),
    "chatml_direct": Template("<|im_start|>system\nAnswer the questions.<|im_end|>",
                              "<|im_start|>user\n{}<|im_end|><|im_start|>assistant\n", "{}<|im_end|>",
                              stop="<|im_end|>", specials=("<|im_start|>", "<|im_end|>")),
    "llava_llama_3": Template(f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_VISION}<|eot_id|>",
                              "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                              "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>",
                              generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
                              stop="<|eot_id|>", specials=_LLAMA3, label_specials=True, strip=True),
    "qwen_1_5": Template("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                         "<|im_start|>user\n{}<|im_end|>\n", "<|im_start|>assistant\n{}<|im_end|>\n",
                         generation="<|im_start|>assistant\n", stop="<|im_end|>",
                         specials=("<|im_start|>", "<|im_end|>"), label_specials=True, label_newlines=True),
}


def _check(messages, template, for_generation=False):
    if template not in TEMPLATES:
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
    if template == "plain" and len(messages) > 2:
        raise ValueError(f"the plain template takes one human turn and one caption, got {len(messages)} turns")


def _values(messages, template):
    """The turns' text: a single `<image>` moved to the start of the first user turn as "<image>\\n"
    (the original preprocess_multimodal, which also strips the turn it came from); plain keeps only
    the image(s) of the human turn (preprocess_plain)."""
    values = [m["value"] for m in messages]
    if template == "plain":
        values[0] = IMAGE_TAG * values[0].count(IMAGE_TAG)
    elif sum(v.count(IMAGE_TAG) for v in values) == 1:
        k = next(i for i, v in enumerate(values) if IMAGE_TAG in v)
        values[k] = values[k].replace(IMAGE_TAG, "").strip()
        values[0] = IMAGE_TAG + "\n" + values[0]
    return [v.strip() for v in values] if TEMPLATES[template].strip else values


def _parts(messages, template, for_generation):
    """The prompt as (text, supervised, from_template) pieces, in order (bos not included)."""
    _check(messages, template, for_generation)
    t = TEMPLATES[template]
    parts = [(t.system, False, True)]
    for i, value in enumerate(_values(messages, template)):
        fmt, supervised = (t.user, False) if i % 2 == 0 else (t.reply, True)
        before, after = fmt.split("{}")
        parts += [(before, supervised, True), (value, supervised, False), (after, supervised, True)]
    if for_generation:
        parts.append((t.generation, False, True))
    return [p for p in parts if p[0]]


def prompt(messages, template="vicuna_v1"):
    """The exact prompt string of the original `conversation.py`, without the bos token.

    Ends with the generation prompt (vicuna_v1: "ASSISTANT:", no trailing space) when the last
    turn is the user's. plain: "<image>{caption}\\n".
    """
    last = messages[-1] if isinstance(messages, list) and messages else None
    for_generation = isinstance(last, dict) and last.get("from") == "human"
    return "".join(text for text, _, _ in _parts(messages, template, for_generation))


def _split(text, separators):
    """`text` cut at each occurrence of the separator strings, which are kept as pieces of their own."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        sep = next((s for s in separators if text.startswith(s, i)), None)
        if sep is None:
            i += 1
            continue
        pieces += [text[start:i], sep]
        start = i = i + len(sep)
    return [p for p in pieces + [text[start:]] if p]


def _image_counts(messages, num_image_tokens):
    n_tags = sum(m["value"].count(IMAGE_TAG) for m in messages)
    if isinstance(num_image_tokens, int):
        return [num_image_tokens] * n_tags
    counts = list(num_image_tokens)
    if len(counts) != n_tags:
        raise ValueError(f"conversation has {n_tags} {IMAGE_TAG} tags but {len(counts)} "
                         "num_image_tokens entries were given")
    return counts


def _build(messages, tok, template, num_image_tokens, for_generation):
    parts = _parts(messages, template, for_generation)       # checks the template and messages first
    t = TEMPLATES[template]
    counts = iter(_image_counts(messages, num_image_tokens))
    ids, labels = [], []
    run, run_sup = "", []                    # text between special tokens, and per character: supervised?
    newline = tok.encode("\n") if t.label_newlines else []

    def flush():
        nonlocal run, run_sup
        if run:
            for token, (start, _) in zip(*tok.encode_with_offsets(run)):
                ids.append(token)
                supervised = run_sup[min(start, len(run) - 1)] or [token] == newline
                labels.append(token if supervised else IGNORE_INDEX)
        run, run_sup = "", []

    def special(token_id, supervised):
        flush()
        ids.append(token_id)
        labels.append(token_id if supervised else IGNORE_INDEX)

    if tok.bos_id is not None:
        special(tok.bos_id, t.label_specials)
    for text, supervised, from_template in parts:
        for piece in _split(text, t.specials if from_template else (IMAGE_TAG,)):
            if from_template and piece in t.specials:
                special(tok.special_id(piece), supervised or t.label_specials)
            elif not from_template and piece == IMAGE_TAG:
                flush()
                n = next(counts)
                ids += [tok.image_token_id] * n
                labels += [IGNORE_INDEX] * n
            else:
                run += piece
                run_sup += [supervised] * len(piece)
    flush()
    return ids, labels


def tokenize(messages, tokenizer, template="vicuna_v1", num_image_tokens=576):
    """(input_ids, labels) for a training conversation; labels are -100 outside the replies.

    messages: LLaVA JSON `conversations`, [{"from": "human"|"gpt", "value": str}, ...],
    alternating and ending with a gpt reply. num_image_tokens: int, or one int per `<image>`.
    """
    return _build(messages, tokenizer, template, num_image_tokens, for_generation=False)


def generation_prompt(messages, tokenizer, template="vicuna_v1", num_image_tokens=576):
    """Prompt ids for sampling/eval: the conversation so far (ending with a human turn) and the
    template's generation prompt (vicuna_v1: "ASSISTANT:" with no trailing space)."""
    return _build(messages, tokenizer, template, num_image_tokens, for_generation=True)[0]


def stop_ids(tokenizer, template):
    """The token ids that end a reply of this template (for generation): its end-of-turn token, and eos."""
    stop = tokenizer.special_id(TEMPLATES[template].stop)
    return [stop] + [i for i in (tokenizer.eos_id,) if i not in (None, stop)]
