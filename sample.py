"""
Ask a LLaVA model about an image, streaming the answer token by token.

    python sample.py --model DIR --image IMG --prompt "What is in the image?"
    python sample.py --model DIR --image A.png --image B.png --prompt "What differs?"   # several images
    python sample.py --model DIR --image IMG --chat        # multi-turn, one question per stdin line

The conversation template (vicuna_v1 for LLaVA-1.5, mistral_instruct, qwen_1_5, ...) and the image
mode (crop | pad | squash | anyres) come from the checkpoint (--template overrides the template).
The images belong to the first user turn (one "<image>\\n" each) and stay in context for later
turns of --chat; every turn re-encodes the whole conversation (simple, and cheap next to the
answer itself). temperature 0 is greedy decoding.

Every bad argument or input is one line, not a traceback: a missing, corrupt, too large or too
thin image, a sampling setting out of range, a dtype or device this machine lacks, and a prompt
that leaves no room for --max-new-tokens in the model's context (--truncate-prompts cuts the
start of the question instead). In --chat mode a bad turn is reported and skipped.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from eval import fit_prompt
from nanollava import LLaVA, conversation
from nanollava import image as image_lib
from nanollava.cli import DTYPES, device, non_negative_float, non_negative_int, positive_int, probability
from nanollava.data import open_image, pad_views
from nanollava.generate import stream
from nanollava.tokenizer import Tokenizer


def load(model_dir, tokenizer=None, device="cpu", dtype="float32", template=None):
    """The model and its tokenizer; the conversation template is the checkpoint's unless given."""
    tok_path = Path(tokenizer or Path(model_dir) / "tokenizer.json")
    if not tok_path.is_file():
        raise FileNotFoundError(f"tokenizer {tok_path} not found (pass --tokenizer)")
    model = LLaVA.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device, template=template)
    if model.config.template is None:
        raise ValueError(f"{model_dir} does not say which conversation template it uses (no chat template in its "
                         f"tokenizer files); pass --template, one of {', '.join(conversation.TEMPLATES)}")
    print(f"template: {model.config.template}" + (" (--template)" if template else " (from the checkpoint)"),
          file=sys.stderr)
    return model, Tokenizer.from_file(str(tok_path), image_token_id=model.config.image_token_id)


def load_images(paths, config):
    """The images as the model sees them: (pixel_values (N, ...), image_sizes (N, 2), visual tokens per image)."""
    imgs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        imgs.append(open_image(str(path)))              # corrupt, too large, too thin: a ValueError
    return prepare_images(imgs, config)


def prepare_images(imgs, config):
    """Decoded PIL images -> (pixel_values (N, ...), image_sizes (N, 2), visual tokens per image)."""
    processed = image_lib.process_images(imgs, config)
    pixels = [p for p, _, _ in processed]
    pixel_values = pad_views(pixels) if config.image_aspect_ratio == "anyres" else torch.stack(pixels)
    return pixel_values, torch.tensor([s for _, s, _ in processed], dtype=torch.long), [n for _, _, n in processed]


def reply(model, tok, messages, image, args, out=None):
    """Stream one assistant answer to `out` (default: the current sys.stdout); returns (text, stats)."""
    out = out or sys.stdout
    pixel_values, image_sizes, n_img = image if image is not None else (None, None, 0)
    question = messages[-1]["value"]
    tags = "<image>\n" * (len(n_img) if image is not None and len(messages) == 1 else 0)
    if "<image>" in question.removeprefix(tags):
        raise ValueError("'<image>' in the question: sample.py puts the --image in the prompt itself")
    ids = fit_prompt(messages, tok, model.config.template, n_img, model.config.text.context_length,
                     args.max_new_tokens, args.truncate_prompts)
    input_ids = torch.tensor([ids], dtype=torch.long, device=args.device)
    if pixel_values is not None:
        pixel_values, image_sizes = pixel_values.to(args.device), image_sizes.to(args.device)
    new, text = [], ""
    stop = conversation.stop_ids(tok, model.config.template)
    t0 = time.perf_counter()
    t_first = None
    with torch.no_grad():
        for token in stream(model, input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, eos_token_id=stop):
            token = int(token)
            if t_first is None:
                t_first = time.perf_counter() - t0
            if token in stop:
                break
            new.append(token)
            # decode the whole answer and print what is new: SentencePiece merges spaces
            # into the following piece, so token-by-token decoding would lose them
            full = tok.decode(new)
            out.write(full[len(text):])
            out.flush()
            text = full
    dt = time.perf_counter() - t0
    out.write("\n")
    stats = dict(prompt_tokens=len(ids), new_tokens=len(new), ttft_s=t_first or dt,
                 tokens_per_s=(len(new) - 1) / (dt - t_first) if len(new) > 1 and t_first else 0.0)
    return text.strip(), stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (nanollava / llava-hf / original LLaVA)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: MODEL/tokenizer.json)")
    p.add_argument("--template", choices=list(conversation.TEMPLATES),
                   help="conversation template (default: the checkpoint's)")
    p.add_argument("--image", action="append", default=[],
                   help="image file; repeat for several images (optional: text-only without it)")
    p.add_argument("--prompt", help="the question (single-turn mode)")
    p.add_argument("--chat", action="store_true", help="multi-turn: read questions from stdin until EOF or 'exit'")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="at most; fewer at an eos")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="cut an over-long question to fit the model's context (default: an error)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s")
    args = p.parse_args(argv)
    if not args.chat and args.prompt is None:
        p.error("give --prompt, or --chat to read questions from stdin")

    torch.manual_seed(args.seed)
    model, tok = load(args.model, args.tokenizer, args.device, args.dtype, args.template)
    context = model.config.text.context_length
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} positions")
    image = load_images(args.image, model.config) if args.image else None

    def ask(messages):
        text, stats = reply(model, tok, messages, image, args)
        if args.verbose:
            print(f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new tokens, "
                  f"time to first token {1000 * stats['ttft_s']:.0f} ms, "
                  f"{stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
        return text

    prefix = "<image>\n" * len(args.image)
    if not args.chat:
        ask([{"from": "human", "value": prefix + args.prompt}])
        return
    messages = []
    while True:
        if sys.stdin.isatty():
            print("USER: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            break
        if not line.strip():
            continue
        messages.append({"from": "human", "value": (prefix if not messages else "") + line.strip()})
        if sys.stdin.isatty():
            print("ASSISTANT: ", end="", flush=True)
        try:
            messages.append({"from": "gpt", "value": ask(messages)})
        except ValueError as e:                         # this turn cannot be asked: say so, keep the chat
            print(f"sample.py: error: {e}", file=sys.stderr)
            messages.pop()


def cli(argv=None):
    """main() with bad input reported as one clear line instead of a stack trace."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        sys.exit(f"sample.py: error: {e}")


if __name__ == "__main__":
    cli()
