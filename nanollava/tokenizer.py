"""Tokenizer: a thin wrapper on HuggingFace `tokenizers` (the Rust library, not transformers).

Loads any `tokenizer.json` (llava-hf repos ship one; the toy data set trains its own) and knows
the special ids LLaVA needs: bos, eos, unk, pad and the image placeholder `<image>` (id 32000 in
llava-hf). Their strings come from a `tokenizer_config.json` beside it when there is one (Llama-3's
bos is `<|begin_of_text|>`), else LLaMA's `<s>`, `</s>`, `<unk>`.

Padding uses unk, as LLaVA does (eos when there is no unk), never a `<pad>` token: llava-hf's `<pad>`
(32001) lies past the 32,000 embedding rows of the Vicuna that training starts from.

`encode` never adds special tokens and reads every string as text: a literal "</s>" in the data is
not the eos token. conversation.py places bos, the template's special tokens and the image tokens.
Text that is not valid Unicode (a lone surrogate such as "\udcff", which JSON allows) is a
ValueError, so a data set can skip the record instead of dying on a TypeError.
"""
import json
import os

from tokenizers import Tokenizer as _HFTokenizer


def _config_token(config, key, default):
    """A special token's string in tokenizer_config.json: a plain string or {"content": ...}."""
    value = config.get(key)
    return value.get("content", default) if isinstance(value, dict) else value or default


class Tokenizer:
    """`tokenizers.Tokenizer` plus the special ids; `encode(text, bos=False) -> list[int]`."""

    def __init__(self, tok, bos="<s>", eos="</s>", unk="<unk>", image="<image>", image_token_id=None):
        self.tok = tok
        self.tok.encode_special_tokens = True       # special-token strings in text are text
        self.bos_id, self.eos_id, self.unk_id = (tok.token_to_id(t) for t in (bos, eos, unk))
        self.pad_id = self.unk_id if self.unk_id is not None else self.eos_id
        own = tok.token_to_id(image)
        if own is not None and image_token_id is not None and own != image_token_id:
            raise ValueError(f"the tokenizer's {image!r} is id {own} but the model's image_token_id is "
                             f"{image_token_id}: this tokenizer belongs to another model")
        self._image_token_id = own if own is not None else image_token_id
        self.image_token = image
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.unk_id, self._image_token_id)
                            if i is not None} | {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path, image_token_id=None):
        """Load `tokenizer.json` (a file, or a directory that holds one); special-token strings from a
        tokenizer_config.json beside it. image_token_id: the model's placeholder id, for a tokenizer
        that has no `<image>` token (original LLaVA directories)."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust error names only the serde problem
            raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({e})") from None
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        names = {k: _config_token(config, f"{k}_token", d) for k, d in (("bos", "<s>"), ("eos", "</s>"),
                                                                          ("unk", "<unk>"))}
        return cls(tok, image_token_id=image_token_id, **names)

    @property
    def image_token_id(self):
        if self._image_token_id is None:
            raise ValueError(f"this tokenizer has no {self.image_token!r} token; add it "
                             "(tokenizer.add_special_tokens) before tokenizing images")
        return self._image_token_id

    def special_id(self, token):
        """The id of a special token a conversation template writes (e.g. "<|im_end|>")."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"this tokenizer has no {token!r} token, which the conversation template needs: "
                             "is it the tokenizer of a model trained with another template?")
        return i

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_with_offsets(self, text):
        """(ids, [(start, end) character span of each token in text])."""
        try:
            e = self.tok.encode(text, add_special_tokens=False)
        except TypeError:                             # the Rust side says only "must be str"
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None) \
                if isinstance(text, str) else None
            if bad is None:
                raise
            raise ValueError(f"text is not valid Unicode: lone surrogate {text[bad]!r} at character {bad} "
                             f"(in {text[max(0, bad - 20):bad + 20]!r})") from None
        return e.ids, e.offsets

    def encode(self, text, bos=False):
        """Token ids of `text`; no special tokens unless bos=True prepends `<s>`."""
        ids = self.encode_with_offsets(text)[0]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids, skip_special=True):
        """Text of `ids`; skip_special drops `<s>`, `</s>`, `<pad>`, `<image>` ..."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)


def train_bpe(texts, vocab_size=512, special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<image>")):
    """Train a small LLaMA-style BPE tokenizer (for the toy data set and tests).

    Metaspace pre-tokenizer with the "▁" prefix on every section (prepend_scheme="always",
    the legacy LLaMA behaviour that the original LLaVA was trained with: text right after a
    special token also gets the prefix). Specials get ids 0.. in order: <unk>=0, <s>=1, </s>=2.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = _HFTokenizer(models.BPE(unk_token=special_tokens[0], fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, bos=special_tokens[1], eos=special_tokens[2], unk=special_tokens[0],
                     image=special_tokens[4])
