"""serve.py through FastAPI's test client, on the tiny random model: a streamed answer, multi-turn
with the images kept, every bad input refused with its HTTP status while the server stays up, and
8 concurrent requests all answered in turn."""

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason='serve.py needs the [serve] extra: pip install -e ".[serve]"')
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
from fastapi.testclient import TestClient  # noqa: E402

from test_eval import _load_script, toy  # noqa: E402,F401

serve = _load_script("serve")


@pytest.fixture(scope="module")
def loaded(toy):
    sample = _load_script("sample")
    return sample.load(toy / "model")


@pytest.fixture(scope="module")
def client(loaded):
    model, tok = loaded
    with TestClient(serve.make_app(model, tok, "tiny", max_body=200_000)) as c:
        yield c


@pytest.fixture(scope="module")
def png(toy):
    return base64.b64encode(sorted((toy / "images").iterdir())[0].read_bytes()).decode()


def _events(response):
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]


def _ask(client, messages, images=(), **settings):
    body = dict(messages=[{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(messages)],
                images=list(images), max_new_tokens=8, **settings)
    return client.post("/chat", json=body)


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>nanollava</title>" in page.text and "/chat" in page.text
    info = client.get("/info").json()
    assert info["model"] == "tiny" and info["template"] == "vicuna_v1" and info["context"] == 256


def test_an_answer_streams_token_by_token(client, png):
    events = _events(_ask(client, ["What shape is in the image?"], [png]))
    tokens = [e["token"] for e in events if "token" in e]
    done = events[-1]
    assert done["done"] and len(tokens) > 1, events
    assert "".join(tokens).strip() == done["text"] and 1 < done["stats"]["new_tokens"] <= 8
    # a data: URL (what the page's FileReader makes) is an image too; sampling settings are taken
    assert _events(_ask(client, ["And its color?"], ["data:image/png;base64," + png], temperature=0.7, top_k=5,
                        top_p=0.9))[-1]["done"]


def test_multi_turn_keeps_the_images(client, png, monkeypatch):
    seen = []
    real = serve.sample.reply

    def spy(model, tok, messages, images, args, out):
        seen.append(([dict(m) for m in messages], images))
        return real(model, tok, messages, images, args, out)
    monkeypatch.setattr(serve.sample, "reply", spy)
    first = _events(_ask(client, ["What shape is it?"], [png, png]))[-1]["text"]
    second = _events(_ask(client, ["What shape is it?", first, "What color is it?"], [png, png]))[-1]
    assert second["done"] and len(seen) == 2
    (m1, img1), (m2, img2) = seen
    assert m1[0]["value"] == "<image>\n<image>\nWhat shape is it?" and m2[0] == m1[0], "both images, first turn"
    assert m2[1] == {"from": "gpt", "value": first} and m2[2] == {"from": "human", "value": "What color is it?"}
    assert img2[0].shape == img1[0].shape and len(img2[2]) == 2


@pytest.mark.parametrize("case, status, message", [
    ("not an image", 400, "image 1 is not an image"),
    ("not base64", 400, "image 1 is not an image"),
    ("image over the pixel limit", 413, "image too large"),
    ("body over the limit", 413, "request body over the limit of 200,000 bytes"),
    ("prompt over the context", 400, "exceeds the model's context of 256"),
    ("not JSON", 400, "the body is not JSON"),
    ("roles out of order", 400, "roles alternate, starting with the user"),
    ("max_new_tokens past the context", 400, "max_new_tokens must be an integer in [1, 256)"),
    ("<image> in the text", 400, "'<image>' in the text"),
    ("temperature Infinity", 400, "temperature must be a number >= 0, got inf"),
    ("top_k Infinity", 400, "top_k must be an integer >= 0, got inf"),
])
def test_bad_input_is_a_clear_http_error_and_the_server_stays_up(client, png, tmp_path, case, status, message):
    from test_data import png_header
    png_header(tmp_path / "huge.png", 20000, 20000)          # a 20000x20000 header in a few bytes
    huge = base64.b64encode((tmp_path / "huge.png").read_bytes()).decode()
    ask = {"not an image": lambda: _ask(client, ["hi"], [base64.b64encode(b"hello, world").decode()]),
           "not base64": lambda: _ask(client, ["hi"], ["%%%"]),
           "image over the pixel limit": lambda: _ask(client, ["hi"], [huge]),
           "body over the limit": lambda: _ask(client, ["hi"], ["A" * 300_000]),
           "prompt over the context": lambda: _ask(client, ["what shape " * 300], [png]),
           "not JSON": lambda: client.post("/chat", content=b"{not json"),
           "roles out of order": lambda: client.post("/chat", json={"messages": [{"role": "assistant", "content": "x"}]}),
           "max_new_tokens past the context": lambda: client.post(
               "/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 256}),
           "<image> in the text": lambda: _ask(client, ["what is <image> this"], [png]),
           "temperature Infinity": lambda: client.post(      # Python's json takes it, JSON does not
               "/chat", content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}'),
           "top_k Infinity": lambda: client.post(
               "/chat", content=b'{"messages": [{"role": "user", "content": "hi"}], "top_k": Infinity}')}[case]
    r = ask()
    assert r.status_code == status and message in r.json()["detail"], (r.status_code, r.text)
    assert _events(_ask(client, ["What shape is it?"], [png]))[-1]["done"], "the server still answers"


def test_eight_concurrent_requests_are_all_answered_in_turn(client, png):
    start = threading.Barrier(8)

    def one(i):
        start.wait()
        return _events(_ask(client, [f"Question {i}: what shape is it?"], [png]))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r[-1].get("done") for r in results), [r[-1] for r in results]
    assert any(e.get("queued") for r in results for e in r), "later requests wait for the model"


def test_a_failing_generation_fails_its_request_not_the_server(client, png, monkeypatch):
    real, calls = serve.sample.reply, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)
    monkeypatch.setattr(serve.sample, "reply", flaky)
    assert _events(_ask(client, ["hi"], [png]))[-1] == {"error": "generation failed: RuntimeError: CUDA out of memory"}
    assert _events(_ask(client, ["hi"], [png]))[-1]["done"]


def test_serve_listens_on_localhost_by_default(toy, monkeypatch):
    import uvicorn
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    serve.main(["--model", str(toy / "model")])
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
