"""An lmms-eval model: lmms-eval's tasks run on a nanollava checkpoint (as nanoVLM provides one).

    pip install -e ".[lmms]" torchvision==0.28.0      # the torchvision of your torch (2.13 here)
    python -m lmms_eval --model nanollava --model_args pretrained=out/toy/stage2/final --tasks mme

pyproject.toml registers it under lmms-eval's "lmms_eval.models" entry point, so `--model
nanollava` finds it once nanollava is installed. Each request is answered as eval.py answers a
question: the task's images (one "<image>\\n" each) before its prompt in the checkpoint's template,
its generation_kwargs (max_new_tokens, temperature, top_p, until), stopped at the template's end of
turn. A prompt that leaves no room for max_new_tokens in the context is answered "" (wrong) with a
warning, not a crashed run. Generation only: loglikelihood tasks are refused with one line.
"""
import warnings

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from nanollava import LLaVA, conversation
from nanollava import image as image_lib
from nanollava.data import pad_views
from nanollava.generate import generate
from nanollava.tokenizer import Tokenizer


class NanoLLaVA(lmms):
    def __init__(self, pretrained, tokenizer=None, device="cpu", dtype="float32", template=None, **kwargs):
        super().__init__()
        self.device = device
        self.model = LLaVA.from_pretrained(pretrained, dtype=getattr(torch, dtype), device=device, template=template)
        if self.model.config.template is None:
            raise ValueError(f"{pretrained} does not say which conversation template it uses: pass template=")
        self.tok = Tokenizer.from_file(tokenizer or f"{pretrained}/tokenizer.json",
                                       image_token_id=self.model.config.image_token_id)

    def answer(self, context, images, gen_kwargs):
        """One request: (prompt text, [PIL images], generation_kwargs) -> the answer text."""
        config, template = self.model.config, self.model.config.template
        max_new = int(gen_kwargs.get("max_new_tokens", 128))
        n_img, pixel_values, image_sizes = [], None, None
        if images:
            processed = image_lib.process_images([im.convert("RGB") for im in images], config)
            pixels = [p for p, _, _ in processed]
            pixel_values = (pad_views(pixels) if pixels[0].dim() == 4 else torch.stack(pixels)).to(self.device)
            image_sizes = torch.tensor([s for _, s, _ in processed], dtype=torch.long, device=self.device)
            n_img = [n for _, _, n in processed]
        text = "<image>\n" * len(n_img) + context.replace("<image>", "").strip()
        ids = conversation.generation_prompt([{"from": "human", "value": text}], self.tok, template, n_img)
        if len(ids) + max_new > config.text.context_length:
            warnings.warn(f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the context of "
                          f"{config.text.context_length}: answered ''")
            return ""
        stop = conversation.stop_ids(self.tok, template)
        with torch.no_grad():
            new = generate(self.model, torch.tensor([ids], device=self.device), pixel_values, image_sizes,
                           max_new_tokens=max_new, temperature=float(gen_kwargs.get("temperature") or 0.0),
                           top_p=float(gen_kwargs.get("top_p") or 1.0), eos_token_id=stop)[0].tolist()
        answer = self.tok.decode(new[:next((k for k, t in enumerate(new) if t in stop), len(new))])
        until = gen_kwargs.get("until") or []
        for s in [until] if isinstance(until, str) else until:
            answer = answer.split(s)[0] if s else answer
        return answer.strip()

    def generate_until(self, requests):
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            images = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            answer = self.answer(context, [im for im in images if hasattr(im, "convert")], dict(gen_kwargs))
            out.append(answer)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("nanollava's lmms-eval model only generates (generate_until tasks)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("nanollava's lmms-eval model answers single-round tasks")


def manifest():
    """lmms-eval's model registry entry (pyproject.toml [project.entry-points."lmms_eval.models"])."""
    return ModelManifest(model_id="nanollava", simple_class_path="nanollava.lmms.NanoLLaVA")
