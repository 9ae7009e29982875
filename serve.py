"""
A chat page on localhost, LLaVA's demo in one file: drop images, ask, watch the answer stream.

    pip install -e ".[serve]"
    python serve.py --model out/toy/stage2/final            # then open http://127.0.0.1:8000

The page (serve.html: one static file, no build step) keeps the conversation and sends it whole
with every question, images included; as in `sample.py --chat`, the images belong to the first
question and stay in context for the turns after it. One model serves everyone: requests wait in
a first-come first-served queue for the one worker thread that owns the model. A request that
fails (bad input, a generation error) gets its error and the others go on; a client that goes
away stops its answer at the next token.

HTTP:
  GET  /        the page
  GET  /info    model name, template, context length, default generation settings
  POST /chat    JSON {"messages": [{"role": "user" | "assistant", "content": str}, ...] (ending with
                the user's), "images": [base64 or data URL, ...], "temperature", "top_p", "top_k",
                "max_new_tokens"} -> a text/event-stream of `data: {json}` events: {"queued": n}
                (n requests ahead), {"token": text} ..., then {"done": true, "text", "stats"}, or
                {"error": ...} if generation failed midway.
Bad input is refused before anything streams, and the server stays up: 400 for a body that is not
the JSON above, an upload that is not an image, or a prompt that leaves no room for max_new_tokens
in the model's context; 413 for a body over --max-body-mb or an image over the pixel limit
(nanollava/data.py). It listens on 127.0.0.1 unless --host says otherwise.
"""

import argparse
import asyncio
import base64
import binascii
import json
import math
import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import sample
from eval import fit_prompt
from nanollava import conversation
from nanollava.cli import DTYPES, device, positive_int
from nanollava.data import ImageTooLarge, open_image

PAGE = Path(__file__).with_name("serve.html")
DEFAULTS = dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=256)


class BadRequest(ValueError):
    """Refused input: the HTTP status and a one-line reason."""
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


class Cancelled(Exception):
    """The client went away: stop generating its answer."""


class Worker(threading.Thread):
    """Owns the model and answers jobs one at a time, in the order they came."""

    def __init__(self, model, tok):
        super().__init__(daemon=True)
        self.model, self.tok = model, tok
        self.jobs, self.busy = queue.Queue(), False

    def run(self):
        while True:
            job = self.jobs.get()
            self.busy = True
            try:
                if not job.cancelled.is_set():
                    text, stats = sample.reply(self.model, self.tok, job.messages, job.images, job.args, out=job)
                    job.events.put({"done": True, "text": text, "stats": stats})
            except Cancelled:
                pass
            except Exception as e:                    # out of memory, a bug: this request fails, not the server
                job.events.put({"error": f"generation failed: {type(e).__name__}: {e}"})
            finally:
                self.busy = False


class Job:
    """One request: the conversation, its images and settings; `events` carries its answer back."""

    def __init__(self, messages, images, args):
        self.messages, self.images, self.args = messages, images, args
        self.events, self.cancelled = queue.Queue(), threading.Event()

    def write(self, text):                            # sample.reply streams the answer through here
        if self.cancelled.is_set():
            raise Cancelled()
        self.events.put({"token": text})

    def flush(self):
        pass


def _number(req, key, kind, ok, what):
    value = req.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or kind is int and value != int(value) or not ok(value):      # json.loads takes Infinity, NaN
        raise BadRequest(400, f"{key} must be {what}, got {value!r:.40}")
    return kind(value)


def decode_images(items):
    """base64 strings (or data: URLs) -> decoded PIL images; 400 for what is not an image, 413 for
    one over the pixel limit."""
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise BadRequest(400, "images must be a list of base64 strings")
    imgs = []
    for i, item in enumerate(items):
        name = f"image {i + 1}"
        try:
            data = base64.b64decode(item.split(",", 1)[1] if item.startswith("data:") else item, validate=True)
            imgs.append(open_image(name, data=data))
        except ImageTooLarge as e:
            raise BadRequest(413, str(e)) from None
        except (ValueError, binascii.Error) as e:
            raise BadRequest(400, f"{name} is not an image: {e}") from None
    return imgs


def prepare(body, model, tok, device):
    """A request body -> a Job, or BadRequest saying why not (before anything is queued)."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the body is not JSON") from None
    if not isinstance(req, dict):
        raise BadRequest(400, "the body must be a JSON object")
    turns = req.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRequest(400, "messages must be a non-empty list of {role, content}")
    messages = []
    for i, m in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str):
            raise BadRequest(400, f"message {i + 1} must be {{\"role\": \"{role}\", \"content\": str}}: roles "
                                  f"alternate, starting with the user")
        if "<image>" in m["content"]:
            raise BadRequest(400, f"message {i + 1}: '<image>' in the text (images go in 'images')")
        messages.append({"from": "human" if role == "user" else "gpt", "value": m["content"]})
    if messages[-1]["from"] != "human":
        raise BadRequest(400, "the last message must be the user's")
    context = model.config.text.context_length
    args = SimpleNamespace(
        temperature=_number(req, "temperature", float, lambda v: v >= 0, "a number >= 0"),
        top_p=_number(req, "top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=_number(req, "top_k", int, lambda v: v >= 0, "an integer >= 0"),
        max_new_tokens=_number(req, "max_new_tokens", int, lambda v: 1 <= v < context,
                               f"an integer in [1, {context}) (the model's context)"),
        truncate_prompts=False, device=device)
    imgs = decode_images(req.get("images", []))
    images = None
    if imgs:
        images = sample.prepare_images(imgs, model.config)
        messages[0] = dict(messages[0], value="<image>\n" * len(imgs) + messages[0]["value"])
    try:                                              # the same check the worker makes, before queueing
        fit_prompt(messages, tok, model.config.template, images[2] if images else 0, context, args.max_new_tokens)
    except ValueError as e:
        raise BadRequest(400, str(e)) from None
    return Job(messages, images, args)


def make_app(model, tok, name="model", device="cpu", max_body=20 << 20):
    """The FastAPI app around one model (tests build it directly)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="nanollava")
    worker = Worker(model, tok)
    worker.start()
    app.state.worker = worker

    @app.get("/")
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/info")
    def info():
        return dict(model=name, template=model.config.template, context=model.config.text.context_length,
                    image_mode=model.config.image_aspect_ratio, **DEFAULTS)

    @app.post("/chat")
    async def chat(request: Request):
        if int(request.headers.get("content-length") or 0) > max_body:
            return JSONResponse({"detail": f"request body over the limit of {max_body:,} bytes"}, 413)
        body = bytearray()
        async for chunk in request.stream():      # a body without a length is cut off at the limit too
            body += chunk
            if len(body) > max_body:
                return JSONResponse({"detail": f"request body over the limit of {max_body:,} bytes"}, 413)
        try:
            job = await run_in_threadpool(prepare, bytes(body), model, tok, device)
        except BadRequest as e:
            return JSONResponse({"detail": str(e)}, e.status)
        ahead = worker.jobs.qsize() + worker.busy
        worker.jobs.put(job)

        async def events():
            try:
                if ahead:
                    yield f"data: {json.dumps({'queued': ahead})}\n\n"
                while True:
                    try:
                        event = job.events.get_nowait()
                    except queue.Empty:
                        await asyncio.sleep(0.01)
                        continue
                    yield f"data: {json.dumps(event)}\n\n"
                    if "done" in event or "error" in event:
                        return
            finally:                              # done, or the client went away (cancelled here)
                job.cancelled.set()
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (nanollava / llava-hf / original LLaVA)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: MODEL/tokenizer.json)")
    p.add_argument("--template", choices=list(conversation.TEMPLATES),
                   help="conversation template (default: the checkpoint's)")
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request (images included), in MB")
    args = p.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise SystemExit('serve.py needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    model, tok = sample.load(args.model, args.tokenizer, args.device, args.dtype, args.template)
    app = make_app(model, tok, Path(args.model).name, args.device, int(args.max_body_mb * (1 << 20)))
    print(f"nanollava: http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        raise SystemExit(f"serve.py: error: {e}") from None
