"""eval.py and sample.py end to end on a tiny random LLaVA and a few real easy-vqa images."""

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanollava import benchmarks

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"nanollava_{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_script = _load_script("eval")


def _read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random LLaVA + tokenizer saved as a model dir, 6 easy-vqa test questions and their answers."""
    easy_vqa = pytest.importorskip("easy_vqa")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from nanollava import LLaVA, LLaVAConfig, TextConfig, VisionConfig

    d = tmp_path_factory.mktemp("toy")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(questions[:300] + answers[:300], trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"], show_progress=False))
    torch.manual_seed(0)
    config = LLaVAConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14),
        text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_id=tok.token_to_id("<image>"))
    model = LLaVA(config)
    with torch.no_grad():  # a default-initialised tiny model says the same thing whatever it sees
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(d / "model")
    tok.save(str(d / "model" / "tokenizer.json"))

    paths = easy_vqa.get_test_image_paths()
    (d / "images").mkdir()
    qs, gts = [], []
    yesno = [k for k, a in enumerate(answers) if a in ("yes", "no")][:3]
    opened = [k for k, a in enumerate(answers) if a not in ("yes", "no")][:3]
    for i, k in enumerate(opened + yesno):  # data_prep.py's eval_{questions,answers}.jsonl format
        name = f"{image_ids[k]}.png"
        if not (d / "images" / name).exists():
            shutil.copy(paths[image_ids[k]], d / "images" / name)
        category = "yesno" if answers[k] in ("yes", "no") else "open"
        qs.append(dict(question_id=i, image=name, text=questions[k] + "\nAnswer the question using a single "
                       "word or phrase.", category=category))
        gts.append(dict(question_id=i, answer=answers[k], category=category))
    with open(d / "questions.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in qs)
    with open(d / "gt.jsonl", "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gts)
    return d


def _run(toy, answers, batch_size=3, questions=None, images=None, *extra):
    eval_script.main(["--model", str(toy / "model"), "--questions", str(questions or toy / "questions.jsonl"),
                      "--image-folder", str(images or toy / "images"), "--answers", str(answers),
                      "--batch-size", str(batch_size), "--max-new-tokens", "6", *extra])
    return _read(answers)


def test_eval_writes_llava_answer_schema_and_scores_it(toy, tmp_path, capsys):
    recs = _run(toy, tmp_path / "a.jsonl")
    assert [r["question_id"] for r in recs] == list(range(6))
    for r in recs:
        assert set(eval_script.ANSWER_KEYS) <= set(r) and "error" not in r, r
        assert isinstance(r["text"], str) and r["model_id"] == "model"
    scores = eval_script.main(["--benchmark", "toy", "--answers", str(tmp_path / "a.jsonl"),
                               "--annotations", str(toy / "gt.jsonl")])
    assert scores["n"] == 6 and 0 <= scores["toy_acc"] <= 100
    assert scores["open/n"] == 3 and scores["yesno/n"] == 3 and 0 <= scores["yesno/f1"] <= 100
    assert "toy_acc" in capsys.readouterr().out


def test_batched_left_padded_answers_match_one_at_a_time(toy, tmp_path):
    one = _run(toy, tmp_path / "b1.jsonl", batch_size=1)
    batched = _run(toy, tmp_path / "b4.jsonl", batch_size=4)
    assert len({r["text"] for r in one}) > 1, "the random model should answer different questions differently"
    assert [r["text"] for r in batched] == [r["text"] for r in one]


def test_eval_resumes_without_duplicating_answers(toy, tmp_path):
    full = _run(toy, tmp_path / "full.jsonl")
    partial = tmp_path / "partial.jsonl"
    # an interrupted run: two answers written, the third torn mid-line
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    partial.write_text(lines[0] + lines[1] + lines[2][:25])
    resumed = _run(toy, partial)
    assert [r["question_id"] for r in resumed] == list(range(6))
    assert [r["answer_id"] for r in resumed[:2]] == [r["answer_id"] for r in full[:2]], "kept, not redone"
    assert [r["text"] for r in resumed] == [r["text"] for r in full]
    again = _run(toy, partial)  # nothing left to do
    assert len(again) == 6


def test_missing_or_broken_image_gives_error_record_and_run_continues(toy, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(toy / "images", images)
    (images / "broken.png").write_bytes(b"not a png")
    qs = _read(toy / "questions.jsonl")[:3]
    qs[1]["image"] = "does_not_exist.png"
    qs[2]["image"] = "broken.png"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    recs = _run(toy, tmp_path / "a.jsonl", questions=qfile, images=images)
    assert [r["question_id"] for r in recs] == [0, 1, 2]
    assert "error" not in recs[0]
    assert "does_not_exist.png" in recs[1]["error"] and "broken.png" in recs[2]["error"]
    scores = benchmarks.score_toy(tmp_path / "a.jsonl", toy / "gt.jsonl")
    assert scores["failed"] == 2 and scores["missing"] == 0 and scores["n"] == 3
    scores = eval_script.main(["--benchmark", "toy", "--answers", str(tmp_path / "a.jsonl"), "--questions",
                               str(toy / "questions.jsonl"), "--annotations", str(toy / "gt.jsonl")])
    assert scores["failed"] == 2 and scores["missing"] == 3 and scores["n"] == 6, "3 of the 6 never answered"
    assert scores["toy_acc"] <= 100 / 6, "failed and missing answers are wrong"


def test_answer_file_for_another_benchmark_is_rejected(toy, tmp_path):
    wrong = tmp_path / "pope_answers.jsonl"
    wrong.write_text("".join(json.dumps(dict(question_id=q, prompt="Is there a dog?", text="Yes", answer_id="x",
                                             model_id="m", metadata={})) + "\n" for q in (20000001, 20000002)))
    with pytest.raises(ValueError, match="another benchmark"):
        benchmarks.score_toy(wrong, toy / "gt.jsonl")
    with pytest.raises(SystemExit) as exit_info:  # the command line: one clear line, no stack trace
        eval_script.cli(["--benchmark", "toy", "--answers", str(wrong), "--annotations", str(toy / "gt.jsonl")])
    assert str(exit_info.value.code).startswith("eval.py: error:") and "another benchmark" in str(exit_info.value.code)


def test_pope_scoring_cli_reproduces_published_llava_13b_f1(capsys, pope_dir):
    scores = eval_script.main(["--benchmark", "pope", "--answers", str(pope_dir / "answers_llava-v1.5-13b.jsonl"),
                               "--questions", str(pope_dir / "llava_pope_test.jsonl"),
                               "--annotations", str(pope_dir)])
    assert round(scores["pope"], 2) == 85.95 and scores["n"] == 8910
    assert "85.95" in capsys.readouterr().out


def test_sample_streams_an_answer(toy):
    image = next((toy / "images").iterdir())
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(toy / "model"), "--image",
                           str(image), "--prompt", "what shape is in the image?", "--max-new-tokens", "5",
                           "--verbose"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "sample.py printed no answer"
    assert "tokens/s" in proc.stderr and "time to first token" in proc.stderr


def test_sample_chat_keeps_the_image_across_turns(toy, monkeypatch, capsys):
    sample_script = _load_script("sample")
    image = next((toy / "images").iterdir())
    seen = []
    real = sample_script.reply

    def spy(model, tok, messages, image, args, out=sys.stdout):
        seen.append(([dict(m) for m in messages], image is not None))
        return real(model, tok, messages, image, args, out)

    monkeypatch.setattr(sample_script, "reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("what color is the shape?\nis it a circle?\nexit\nignored\n"))
    sample_script.main(["--model", str(toy / "model"), "--image", str(image), "--chat", "--max-new-tokens", "4"])
    assert len(seen) == 2
    (first, has_img1), (second, has_img2) = seen
    assert has_img1 and has_img2
    assert first[0]["value"].startswith("<image>\n") and len(second) == 3
    assert second[0] == first[0] and second[1]["from"] == "gpt"
    assert "<image>" not in second[2]["value"]


def test_score_toy_hand_worked(toy, tmp_path):
    gts = _read(toy / "gt.jsonl")  # 3 open, then 3 yes/no
    texts = [gts[0]["answer"].capitalize() + ".", "purple", gts[2]["answer"], "Yes", "Yes", "No"]
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(dict(question_id=g["question_id"], prompt="", text=t, answer_id="x",
                                               model_id="m", metadata={})) + "\n" for g, t in zip(gts, texts)))
    s = benchmarks.score_toy(answers, toy / "gt.jsonl")
    yn_gold = [g["answer"] for g in gts[3:]]
    yn_right = sum(p.lower() == g for p, g in zip(["yes", "yes", "no"], yn_gold))
    assert s["open/acc"] == pytest.approx(100 * 2 / 3)
    assert s["yesno/acc"] == pytest.approx(100 * yn_right / 3)
    assert s["yesno/yes_ratio"] == pytest.approx(100 * 2 / 3)
    assert s["toy_acc"] == pytest.approx(100 * (2 + yn_right) / 6)


def test_anyres_batch_with_different_tile_counts_matches_one_at_a_time(toy, tmp_path):
    """AnyRes (LLaVA-NeXT): images of different shapes get different tile counts; the batch pads tiles."""
    from PIL import Image
    from nanollava import LLaVA
    base = LLaVA.from_pretrained(toy / "model")
    config = base.config
    config.image_aspect_ratio, config.image_grid_pinpoints = "anyres", [[28, 56], [56, 28], [56, 56]]
    torch.manual_seed(1)
    model = LLaVA(config)
    model.load_state_dict(base.state_dict(), strict=False)  # + a fresh image_newline
    model.save_pretrained(tmp_path / "model")
    shutil.copy(toy / "model" / "tokenizer.json", tmp_path / "model" / "tokenizer.json")
    src = Image.open(next((toy / "images").iterdir())).convert("RGB")
    qs = []
    for i, (w, h) in enumerate([(80, 30), (30, 80), (64, 64)]):
        src.resize((w, h)).save(tmp_path / f"{i}.png")
        qs.append(dict(question_id=i, image=f"{i}.png", text="what shape is it?"))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    texts = {}
    for batch_size in (1, 3):
        out = tmp_path / f"answers_{batch_size}.jsonl"
        eval_script.main(["--model", str(tmp_path / "model"), "--questions", str(tmp_path / "q.jsonl"),
                          "--image-folder", str(tmp_path), "--answers", str(out), "--batch-size", str(batch_size),
                          "--max-new-tokens", "5"])
        recs = _read(out)
        assert [r["question_id"] for r in recs] == [0, 1, 2] and all("error" not in r for r in recs), recs
        texts[batch_size] = [r["text"] for r in recs]
    assert texts[3] == texts[1]


def test_sample_missing_image_is_a_clear_error(toy):
    sample_script = _load_script("sample")
    with pytest.raises(SystemExit) as exit_info:
        sample_script.cli(["--model", str(toy / "model"), "--image", str(toy / "nope.png"), "--prompt", "hi",
                           "--max-new-tokens", "5"])
    assert "nope.png" in str(exit_info.value.code) and "does not exist" in str(exit_info.value.code)


# --- faults: one question never stops a run; failed and missing answers count as wrong ---

def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_image_paths_outside_the_image_folder_are_refused(toy, tmp_path):
    qs = _read(toy / "questions.jsonl")[:3]
    qs[1]["image"] = str(toy / "images" / qs[0]["image"])               # absolute, though it exists
    qs[2]["image"] = "../images/" + qs[0]["image"]                       # ../ out of the folder
    recs = _run(toy, tmp_path / "a.jsonl", questions=_write(tmp_path / "q.jsonl", qs),
                images=tmp_path / "empty_but_named")
    assert "escapes the image folder" in recs[1]["error"] and "escapes the image folder" in recs[2]["error"]


def test_failing_questions_get_error_records_and_are_not_retried_forever(toy, tmp_path, capsys):
    """A 20000x20000 image, "<image>" in the text, a lone surrogate, an over-long prompt: each is
    an error record; the others are answered; a rerun keeps the errors unless --retry-errors."""
    from test_data import png_header
    images = tmp_path / "images"
    shutil.copytree(toy / "images", images)
    png_header(images / "bomb.png", 20000, 20000)
    qs = _read(toy / "questions.jsonl")[:5]
    qs[0]["image"] = "bomb.png"
    qs[1]["text"] = "what is in <image> this?"
    qs[2]["text"] = "what \udcff"
    qs[3]["text"] = "what shape is it " * 300                            # context: 256 positions
    qfile = _write(tmp_path / "q.jsonl", qs)
    recs = _run(toy, tmp_path / "a.jsonl", 3, qfile, images)
    assert [r["question_id"] for r in recs] == [q["question_id"] for q in qs]
    assert "image too large" in recs[0]["error"] and "'<image>'" in recs[1]["error"]
    assert "not valid Unicode" in recs[2]["error"] and "exceeds the model's context of 256" in recs[3]["error"]
    assert "error" not in recs[4] and recs[4]["text"]
    assert "answered 1, 4 failed" in capsys.readouterr().out
    again = _run(toy, tmp_path / "a.jsonl", 3, qfile, images)
    assert again == recs, "a rerun does not ask failed questions again"
    with pytest.warns(UserWarning, match="prompt truncated"):
        retried = _run(toy, tmp_path / "a.jsonl", 3, qfile, images, "--retry-errors", "--truncate-prompts")
    assert len(retried) == 5 and "error" not in retried[-1], "the long question fits once truncated"


def test_resuming_with_another_model_or_settings_is_an_error(toy, tmp_path):
    from safetensors.torch import load_file, save_file
    answers = tmp_path / "a.jsonl"
    _run(toy, answers)
    with pytest.raises(ValueError, match=r"was made with .*'max_new_tokens': 6.*pass another --answers"):
        _run(toy, answers, 3, None, None, "--max-new-tokens", "7")
    other = tmp_path / "other_model"
    shutil.copytree(toy / "model", other)
    weights = load_file(other / "model.safetensors")
    key = next(iter(weights))
    save_file(dict(weights, **{key: weights[key] + 1}), other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"was made with .*model_sha256"):
        eval_script.main(["--model", str(other), "--questions", str(toy / "questions.jsonl"), "--image-folder",
                          str(toy / "images"), "--answers", str(answers), "--max-new-tokens", "6"])
    # the same ids, other questions (another benchmark): refused on resume and when scored
    qs = [dict(q, text="Is there a dog in the image?") for q in _read(toy / "questions.jsonl")]
    with pytest.raises(ValueError, match="another benchmark"):
        _run(toy, answers, 3, _write(tmp_path / "q.jsonl", qs))
    with pytest.raises(ValueError, match="another benchmark"):
        eval_script.main(["--benchmark", "toy", "--answers", str(answers), "--questions", str(tmp_path / "q.jsonl"),
                          "--annotations", str(toy / "gt.jsonl")])


def test_answer_files_with_duplicate_ids_or_non_object_lines_are_refused(toy, tmp_path):
    recs = [dict(question_id=q, prompt="", text="yes", answer_id="x", model_id="m", metadata={}) for q in (0, 1, 0)]
    dup = _write(tmp_path / "dup.jsonl", recs)
    with pytest.raises(SystemExit, match=r"question_id 0 appears twice \(records 1 and 3\)"):
        eval_script.cli(["--benchmark", "toy", "--answers", str(dup), "--annotations", str(toy / "gt.jsonl")])
    (tmp_path / "list.jsonl").write_text(json.dumps(recs[0]) + "\n[1, 2]\n")
    with pytest.raises(SystemExit, match=r"list.jsonl, line 2: expected a JSON object, got list"):
        eval_script.cli(["--benchmark", "toy", "--answers", str(tmp_path / "list.jsonl"),
                         "--annotations", str(toy / "gt.jsonl")])


def test_pope_with_every_answer_failed_scores_zero_and_says_so(tmp_path, capsys):
    splits = {"random": ["yes", "no", "yes"], "popular": ["no", "yes", "no"]}
    qs, qid = [], 0
    for split, labels in splits.items():
        _write(tmp_path / f"coco_pope_{split}.json",
               [dict(question_id=i + 1, text=f"Is there a cat {i}?", label=lab) for i, lab in enumerate(labels)])
        for i in range(len(labels)):
            qs.append(dict(question_id=qid, image="x.jpg", text=f"Is there a cat {i}?\nAnswer the question using a "
                           f"single word or phrase.", category=split))     # llava_pope_test.jsonl's format
            qid += 1
    _write(tmp_path / "q.jsonl", qs)
    answers = [dict(question_id=q["question_id"], prompt=q["text"], text="", answer_id="x", model_id="m",
                    metadata={}, error="image too large") for q in qs[:-1]]          # the last one: missing
    _write(tmp_path / "a.jsonl", answers)
    scores = eval_script.main(["--benchmark", "pope", "--answers", str(tmp_path / "a.jsonl"), "--questions",
                               str(tmp_path / "q.jsonl"), "--annotations", str(tmp_path)])
    assert scores["pope"] == 0.0 and scores["failed"] == 5 and scores["missing"] == 1 and scores["n"] == 6
    assert "(6 questions: 5 failed, 1 without an answer; both scored as wrong)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "argument --temperature: -1 is not a number >= 0"),
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: -5 is not a positive integer"),
    (["--max-new-tokens", "1e9"], "argument --max-new-tokens: '1e9' is not a positive integer"),
    (["--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000 leaves no room for a prompt in the "
                                         "model's context of 256 positions"),
    (["--top-p", "0"], "argument --top-p: 0 is not a number in (0, 1]"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--device", "cuda"], "argument --device: cuda: torch sees no GPU on this machine"),
    (["--image", "huge.png"], "image too large"),
    (["--prompt", "what \udcff"], "not valid Unicode"),
    (["--prompt", "what <image> is it"], "'<image>' in the question"),
    (["--prompt", "what shape " * 300], "exceeds the model's context of 256 positions"),
])
def test_sample_bad_arguments_are_one_line(toy, tmp_path, monkeypatch, capsys, flags, message):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from test_data import png_header
    png_header(tmp_path / "huge.png", 20000, 20000)
    monkeypatch.chdir(tmp_path)
    sample_script = _load_script("sample")
    with pytest.raises(SystemExit) as e:
        sample_script.cli(["--model", str(toy / "model"), "--prompt", "hi", "--max-new-tokens", "5", *flags])
    said = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said and "Traceback" not in said, said


def test_sample_truncates_an_over_long_prompt_when_asked(toy, capsys):
    sample_script = _load_script("sample")
    with pytest.warns(UserWarning, match="prompt truncated"):
        sample_script.main(["--model", str(toy / "model"), "--prompt", "what shape " * 300, "--max-new-tokens", "5",
                            "--truncate-prompts"])
    assert capsys.readouterr().out.strip()


def test_a_generation_error_fails_its_question_not_its_batch(toy, tmp_path, monkeypatch):
    """Every batch runs out of memory; alone, each question is fine except the second."""
    real, singles = eval_script.generate_texts, []

    def flaky(model, tok, items, *args):
        if len(items) > 1:
            raise RuntimeError("CUDA out of memory")
        singles.append(1)
        if len(singles) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(model, tok, items, *args)
    first = _run(toy, tmp_path / "ok.jsonl")
    monkeypatch.setattr(eval_script, "generate_texts", flaky)
    recs = _run(toy, tmp_path / "a.jsonl")
    assert recs[1]["error"] == "generation failed: RuntimeError: CUDA out of memory"
    assert [r["text"] for i, r in enumerate(recs) if i != 1] == [r["text"] for i, r in enumerate(first) if i != 1]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--device", "cuda"], "argument --device: cuda: torch sees no GPU on this machine"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000 leaves no room for a prompt in the model's "
                                     "context of 256 positions"),
])
def test_eval_bad_arguments_are_one_line(toy, tmp_path, capsys, flags, message):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        eval_script.cli(["--model", str(toy / "model"), "--questions", str(toy / "questions.jsonl"),
                         "--answers", str(tmp_path / "a.jsonl"), *flags])
    said = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said, said
