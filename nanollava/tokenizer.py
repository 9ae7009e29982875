"""Tokenizer: a thin wrapper on HuggingFace `tokenizers` (the Rust library, not transformers).

Loads any `tokenizer.json` (llava-hf repos ship one; the toy data set trains its own) and
knows the special ids LLaVA needs: bos `<s>`, eos `</s>`, unk `<unk>`, pad (`<pad>`, or unk as
LLaVA does when there is none) and the image placeholder `<image>` (id 32000 in llava-hf).

`encode` never adds special tokens on its own: conversation.tokenize places `<s>`, `</s>` and the
image tokens itself, segment by segment, so labels can be built constructively. For the same
reason a literal "</s>", "<s>" or "<pad>" inside data text is encoded as the plain text it is
(`encode_special_tokens`), never as the special token: a caption that quotes "</s>" must not end
its sample early. Text that is not valid Unicode (a lone surrogate such as "\udcff", which JSON
allows) is a ValueError, so a data set can skip the record instead of dying on a TypeError.
"""
import os

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """`tokenizers.Tokenizer` plus the special ids; `encode(text, bos=False) -> list[int]`."""

    def __init__(self, tok, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>", image="<image>"):
        self.tok = tok
        tok.encode_special_tokens = True            # "</s>" in text is text (see the module docstring)
        self.bos_id = tok.token_to_id(bos)
        self.eos_id = tok.token_to_id(eos)
        self.unk_id = tok.token_to_id(unk)
        pad_id = tok.token_to_id(pad)
        self.pad_id = pad_id if pad_id is not None else self.unk_id   # LLaVA pads with unk
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self._image_token_id = tok.token_to_id(image)
        self.image_token = image
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id,
                                        self._image_token_id) if i is not None}

    @classmethod
    def from_file(cls, path, **special_tokens):
        """Load `tokenizer.json` (a file, or a directory that holds one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust error names only the serde problem
            raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({e})") from None
        return cls(tok, **special_tokens)

    @property
    def image_token_id(self):
        if self._image_token_id is None:
            raise ValueError(f"this tokenizer has no {self.image_token!r} token; add it "
                             "(tokenizer.add_special_tokens) before tokenizing images")
        return self._image_token_id

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text, bos=False):
        """Token ids of `text`; no special tokens unless bos=True prepends `<s>`."""
        try:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        except TypeError:                             # the Rust side says only "must be str"
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None) \
                if isinstance(text, str) else None
            if bad is None:
                raise
            raise ValueError(f"text is not valid Unicode: lone surrogate {text[bad]!r} at character {bad} "
                             f"(in {text[max(0, bad - 20):bad + 20]!r})") from None
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
                     pad=special_tokens[3], image=special_tokens[4])
