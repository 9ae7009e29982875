"""Every benchmark eval.py reaches, on a small fixture in its official file format: the prompt
equals the official one, a hand-written answer file gets the score worked out by hand in the
comments, and eval.py answers the fixture end to end with a tiny random model (and writes the
test-server files for VQAv2 / VizWiz / DocVQA)."""

import base64
import csv
import json
import shutil

import pytest

from nanollava import benchmarks, conversation
from test_eval import eval_script, toy  # noqa: F401  (the tiny random model + easy-vqa images)

SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."
VIZWIZ = "When the provided information is insufficient, respond with 'Unanswerable'."


@pytest.fixture(scope="module")
def model(toy, tmp_path_factory):
    """The tiny random model with a context of 1024 positions (RoPE: the weights do not change), for
    the long official prompts in a 160-token vocabulary."""
    d = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(toy / "model", d)
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1024
    (d / "config.json").write_text(json.dumps(config))
    return d


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _image(toy, folder, name):
    """An easy-vqa PNG saved under the file name the benchmark uses."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(sorted((toy / "images").iterdir())[0], folder / name)
    return name


# Each builder writes a benchmark's files under d and returns: eval.py's flags (--questions,
# --image-folder, --annotations), the official prompt texts of the questions, in order, the answers
# to score (a text, or None for a failed question), and the scores they must get.

def vqav2(toy, d):
    names = [_image(toy, d, f"COCO_test2015_00000026214{i}.jpg") for i in range(3)]
    qs = [dict(question_id=262144000 + i, image=n, text=f"{t}\n{SHORT}", category="default")
          for i, (n, t) in enumerate(zip(names, ["How many dogs?", "Is it sunny?", "What color?"]))]
    ann = {"annotations": [dict(question_id=262144000, answers=[{"answer": "2"}] * 2 + [{"answer": "3"}] * 8),
                           dict(question_id=262144001, answers=[{"answer": "yes"}] * 10),
                           dict(question_id=262144002, answers=[{"answer": "red"}] * 10)]}
    # "Two" -> "2", said by 2 of 10: leaving out one of them 1/3 (2 subsets), else 2/3 (8): 0.6;
    # "Yes." -> "yes": 1.0; the failed question: 0. (0.6 + 1 + 0) / 3
    return (dict(questions=_jsonl(d / "q.jsonl", qs), image_folder=d, annotations=_json(d / "ann.json", ann)),
            [q["text"] for q in qs], ["Two", "Yes.", None], {"vqav2": 100 * 1.6 / 3, "failed": 1})


def vizwiz(toy, d):
    names = [_image(toy, d, f"VizWiz_val_0000000{i}.jpg") for i in range(2)]
    qs = [dict(question_id=i, image=n, text=t) for i, (n, t) in enumerate(zip(names, ["What is this?", "Which soup?"]))]
    ann = [dict(image=names[0], question="What is this?", answers=[{"answer": "unanswerable", "answer_confidence": "yes"}] * 10),
           dict(image=names[1], question="Which soup?", answers=[{"answer": "tomato soup"}] * 3 + [{"answer": "tomato"}] * 7)]
    # "Unanswerable." -> "unanswerable": 1.0; "Tomato soup": 3 of 10, leave-one-out mean of
    # min(1, m/3) = (3 * 2/3 + 7 * 1) / 10 = 0.9; mean 0.95
    return (dict(questions=_jsonl(d / "llava_test.jsonl", qs), image_folder=d, annotations=_json(d / "val.json", ann)),
            [f"What is this?\n{VIZWIZ}\n{SHORT}", f"Which soup?\n{VIZWIZ}\n{SHORT}"],
            ["Unanswerable.", "Tomato soup"], {"vizwiz": 95.0})


def textvqa(toy, d):
    name = _image(toy, d, "0054c91397f2fe05.jpg")
    qs = [dict(question_id=7, image=name, text=f"what brand is this?\nReference OCR token: nokia, 3\n{SHORT}"),
          dict(question_id=8, image=name, text=f"what number is it?\n{SHORT}")]
    ann = {"data": [dict(image_id=7, question="what brand is this?", answers=["nokia"] * 10),
                    dict(image_id=8, question="what number is it?", answers=["3"] * 2 + ["three"] * 1 + ["4"] * 7)]}
    # "Nokia" 1.0; "three" -> "3", matches all 3 of "3", "3", "three": 3 * 2/3 + 7 * 1 over 10 = 0.9
    return (dict(questions=_jsonl(d / "q.jsonl", qs), image_folder=d, annotations=_json(d / "TextVQA_0.5.1_val.json", ann)),
            [q["text"] for q in qs], ["Nokia", "three"], {"textvqa": 95.0})


def gqa(toy, d):
    name = _image(toy, d, "n161313.jpg")
    qs = [dict(question_id="201307251", image=name, text=f"Is the sky dark?\n{SHORT}"),
          dict(question_id="201640614", image=name, text=f"Who is wearing a shirt?\n{SHORT}")]
    ann = {"201307251": {"answer": "no"}, "201640614": {"answer": "girl"}}
    # "No." -> rstrip(".").lower() = "no": right; "The girl" != "girl": wrong
    return (dict(questions=_jsonl(d / "q.jsonl", qs), image_folder=d,
                 annotations=_json(d / "testdev_balanced_questions.json", ann)),
            [q["text"] for q in qs], ["No.", "The girl"], {"gqa": 50.0})


def pope(toy, d):
    name = _image(toy, d, "COCO_val2014_000000310196.jpg")
    labels = {"adversarial": ["yes", "no"], "random": ["yes", "no"]}
    qs, k = [], 1
    for split, labs in labels.items():
        _jsonl(d / f"coco_pope_{split}.json", [dict(question_id=i + 1, image=name, text=f"Is there a {o} in the image?",
                                                     label=lab) for i, (o, lab) in enumerate(zip(["dog", "cat"], labs))])
        for o in ["dog", "cat"]:
            qs.append(dict(question_id=k, image=name, text=f"Is there a {o} in the image?", category=split))
            k += 1
    # adversarial: Yes / No for yes / no: F1 1; random: Yes / Yes for yes / no: P 1/2 R 1, F1 2/3
    return (dict(questions=_jsonl(d / "llava_pope_test.jsonl", qs), image_folder=d, annotations=d),
            [f"Is there a {o} in the image?\n{SHORT}" for o in ["dog", "cat"] * 2],
            ["Yes", "No, there is not.", "Yes", "Yes"], {"pope": 100 * (1 + 2 / 3) / 2, "random/precision": 50.0})


def mme(toy, d):
    root = d / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    _image(toy, root, "existence/000000006040.jpg")
    qs = [dict(question_id="existence/000000006040.jpg", image="existence/000000006040.jpg",
               text=f"Is there a {o} in this image?\n{SHORT}", category="existence") for o in ("train", "bed")]
    # both questions of the image right: acc 100 + acc+ 100 = 200
    return (dict(questions=None, image_folder=root, annotations=root, jsonl=qs),
            [q["text"] for q in qs], ["Yes", "No"], {"mme": 200.0})


def seed(toy, d):
    _image(toy, d, "SEED-Bench-image/1454426_2591111986.jpg")
    options = "\nA. One\nB. Two\nC. Three\nD. Four"
    qs = [dict(question_id=str(101669 + i), image="SEED-Bench-image/1454426_2591111986.jpg",
               text=f"How many towels are in the image?{options}\n{MC}", category="Instances Counting") for i in range(2)]
    ann = {"questions": [dict(question_id=str(101669 + i), answer="A", data_type="image", question_type_id=5)
                         for i in range(2)], "question_type": {"Instances Counting": 5}}
    # "A" is the answer; "A." is not the letter itself: LLaVA compares the text with the letter
    return (dict(questions=_jsonl(d / "llava-seed-bench.jsonl", qs), image_folder=d,
                 annotations=_json(d / "SEED-Bench.json", ann)),
            [q["text"] for q in qs], ["A", "A."], {"seed": 50.0, "seed/image": 50.0})


def scienceqa(toy, d):
    _image(toy, d, "1/image.png")
    body = "Context: Select the best answer.\nWhich property do these three objects have in common?\nA. shiny\nB. opaque"
    qs = [dict(id="1", image="1/image.png", conversations=[{"from": "human", "value": body + "\n<image>"},
                                                           {"from": "gpt", "value": "B"}]),
          dict(id="2", conversations=[{"from": "human", "value": "Which word is a noun?\nA. run\nB. dog"},
                                      {"from": "gpt", "value": "B"}])]
    problems = {"1": dict(choices=["shiny", "opaque"], answer=1, image="image.png"),
                "2": dict(choices=["run", "dog"], answer=1, image=None)}
    _json(d / "pid_splits.json", {"test": ["1", "2"]})
    # IMG accuracy counts the question with an image only: "B" right -> 100; "The answer is A." for
    # the text question is wrong -> all 50
    return (dict(questions=_json(d / "llava_test_CQM-A.json", qs), image_folder=d,
                 annotations=_json(d / "problems.json", problems)),
            [f"{body}\n{MC}", f"Which word is a noun?\nA. run\nB. dog\n{MC}"],
            ["B", "The answer is A."], {"scienceqa": 100.0, "all": 50.0})


def mmbench(toy, d):
    png = base64.b64encode(sorted((toy / "images").iterdir())[0].read_bytes()).decode()
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
            "comment", "split", "image"]
    rows = [[0, "What shape is it?", "nan", "circle", "square", "triangle", "", "A", "shape", "x", "y", "nan", "dev", png],
            [1000000, "What shape is it?", "nan", "square", "triangle", "circle", "", "C", "shape", "x", "y", "nan",
             "dev", "0"],                                          # circular copy: options rotated, image by index
            [1, "Which color?", "Look closely.", "red", "blue", "nan", "nan", "B", "color", "x", "y", "nan", "dev", png]]
    with open(d / "mmbench_dev.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows(rows)
    # question 0: right in its first pass, wrong in the rotated one -> wrong under CircularEval;
    # question 1: "blue" is option B's text -> B, right. Circular 1/2, vanilla (rows < 1e6) 2/2
    return (dict(questions=d / "mmbench_dev.tsv", image_folder=d, annotations=None),
            [f"What shape is it?\nA. circle\nB. square\nC. triangle\n{MC}",
             f"What shape is it?\nA. square\nB. triangle\nC. circle\n{MC}",
             f"Look closely.\nWhich color?\nA. red\nB. blue\n{MC}"],
            ["A", "A", "blue"], {"mmbench": 50.0, "mmbench/vanilla": 100.0})


def chartqa(toy, d):
    name = _image(toy, d / "png", "41699051005347.png")
    _json(d / "test_human.json", [dict(imgname=name, query="What is the peak value?", label="104"),
                                  dict(imgname=name, query="Which country is first?", label="Paris")])
    _json(d / "test_augmented.json", [dict(imgname=name, query="What share is red?", label="0.6")])
    # 100 vs 104: off by 3.8% <= 5%, right; "paris" == "Paris" case-insensitively; "50%" = 0.5 vs 0.6: wrong
    return (dict(questions=d, image_folder=d / "png", annotations=None),
            [f"What is the peak value?\n{benchmarks.CHARTQA}", f"Which country is first?\n{benchmarks.CHARTQA}",
             f"What share is red?\n{benchmarks.CHARTQA}"],
            ["100", "paris", "50%"], {"chartqa": 100 * 2 / 3, "chartqa/human": 100.0, "chartqa/augmented": 0.0})


def docvqa(toy, d):
    name = _image(toy, d, "documents/pybv0228_81.png")
    data = {"dataset_name": "docvqa", "dataset_split": "val",
            "data": [dict(questionId=49153, question="What is the date?", image=name, answers=["1/8/93", "1-8-93"]),
                     dict(questionId=49154, question="Who signed it?", image=name, answers=["Smith"])]}
    # "1/8/9": distance 1 over 6 -> 5/6; "Jones": 1 - 4/5 = 0.2 < 0.5 -> 0; mean 5/12
    return (dict(questions=_json(d / "val_v1.0.json", data), image_folder=d, annotations=None),
            [f"What is the date?\n{SHORT}", f"Who signed it?\n{SHORT}"], ["1/8/9", "Jones"], {"docvqa": 100 * 5 / 12})


def infovqa(toy, d):
    name = _image(toy, d, "37313.jpeg")
    data = {"data": [dict(questionId=65718, question="How many people?", image_local_name=name, answers=["45%", "45"])]}
    return (dict(questions=_json(d / "infographicsVQA_val_v1.0_withQT.json", data), image_folder=d, annotations=None),
            [f"How many people?\n{SHORT}"], ["45"], {"infovqa": 100.0})


BUILDERS = [vqav2, vizwiz, textvqa, gqa, pope, mme, seed, scienceqa, mmbench, chartqa, docvqa, infovqa]


def _build(builder, toy, d):
    flags, prompts, texts, expected = builder(toy, d)
    if "jsonl" in flags:                                  # MME's llava_mme.jsonl lies outside its image dir
        flags["questions"] = _jsonl(d / "llava_mme.jsonl", flags.pop("jsonl"))
    return flags, prompts, texts, expected


def _flags(flags):
    return ["--questions", str(flags["questions"]), "--image-folder", str(flags["image_folder"])] + \
        (["--annotations", str(flags["annotations"])] if flags["annotations"] else [])


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_benchmark_prompt_is_the_official_one_and_hand_worked_score(builder, toy, tmp_path, capsys):
    name = builder.__name__
    flags, prompts, texts, expected = _build(builder, toy, tmp_path)
    questions = benchmarks.read_questions(flags["questions"], name)
    assert [q["text"] for q in questions] == prompts
    answers = [dict(question_id=q["question_id"], prompt=q["text"], text=t or "", answer_id="x", model_id="m",
                    metadata={}, **({"error": "image too large"} if t is None else {}))
               for q, t in zip(questions, texts)]
    _jsonl(tmp_path / "answers.jsonl", answers)
    scores = eval_script.main(["--benchmark", name, "--answers", str(tmp_path / "answers.jsonl"), *_flags(flags)])
    for k, v in expected.items():
        assert scores[k] == pytest.approx(v), f"{name} {k}: {scores[k]} != {v} (worked out by hand)"
    assert scores["n"] == len(questions) and name in capsys.readouterr().out


def test_the_whole_prompt_is_llava_15s():
    """model_vqa_loader.py: "<image>\\n" + the question file's text in the vicuna_v1 template."""
    text = f"Which soup?\n{VIZWIZ}\n{SHORT}"
    assert conversation.prompt([{"from": "human", "value": "<image>\n" + text}], "vicuna_v1") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhich soup?\nWhen the provided "
        "information is insufficient, respond with 'Unanswerable'.\nAnswer the question using a single word or "
        "phrase. ASSISTANT:")


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_eval_answers_each_benchmark_fixture_end_to_end(builder, toy, model, tmp_path):
    """eval.py --model ... --benchmark NAME on the official files: every question asked (no error
    record) with the official prompt, scored, and the test-server file written where there is one."""
    name = builder.__name__
    flags, prompts, _, _ = _build(builder, toy, tmp_path)
    answers, upload = tmp_path / "answers.jsonl", tmp_path / "upload.json"
    has_upload = name in ("vqav2", "vizwiz", "docvqa", "infovqa")
    scores = eval_script.main(["--model", str(model), "--benchmark", name, "--answers", str(answers),
                               "--max-new-tokens", "4", "--batch-size", "4", *_flags(flags)]
                              + (["--upload", str(upload)] if has_upload else []))
    recs = [json.loads(line) for line in open(answers)]
    assert [r["prompt"] for r in recs] == prompts and not [r for r in recs if "error" in r], recs
    assert scores["n"] == len(prompts) and scores["failed"] == scores["missing"] == 0
    assert name in scores and 0 <= scores[name] <= (1000 if name == "mme" else 100)
    if has_upload:
        assert len(json.loads(upload.read_text())) == len(prompts)


def test_vqav2_and_vizwiz_upload_files_are_what_the_servers_take(tmp_path):
    """The EvalAI files LLaVA's convert_{vqav2,vizwiz}_for_submission.py write: a JSON list, one entry
    per question of the split in its order, answers through the EvalAI answer processor (the outputs
    below are what LLaVA's m4c_evaluator.EvalAIAnswerProcessor gives), "" for an unanswered question."""
    raw = ["Two dogs.", "No, it is not.", "It's a cat", "dont know", "1,000", "red/white", "The Eiffel Tower",
           "Unanswerable."]
    official = ["2 dogs", "no it is not", "it 's cat", "don't know", "1000", "red white", "eiffel tower",
                "unanswerable"]
    qs = [dict(question_id=262144000 + i, image=f"VizWiz_test_{i:08d}.jpg", text="q") for i in range(len(raw) + 1)]
    answers = [dict(question_id=q["question_id"], prompt="q", text=t) for q, t in zip(qs, raw)]
    answers[1]["error"] = "image too large"                  # a failed question uploads as ""
    official[1] = ""
    vqav2 = benchmarks.upload("vqav2", answers, qs)
    assert vqav2 == [{"question_id": q["question_id"], "answer": a} for q, a in zip(qs, official + [""])]
    vizwiz = benchmarks.upload("vizwiz", answers, qs)
    assert vizwiz == [{"image": q["image"], "answer": a} for q, a in zip(qs, official + [""])]
    assert json.loads(json.dumps(vqav2)) == vqav2 and isinstance(vqav2[0]["question_id"], int)


def test_benchmark_files_in_the_wrong_format_are_one_line_errors(tmp_path):
    _json(tmp_path / "x.json", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"no 'imgname' field .* is this the right file\?"):
        benchmarks.read_questions(tmp_path / "x.json", "chartqa")
    with pytest.raises(ValueError, match=r"expected \{\"data\": \[questions\]\}"):
        benchmarks.read_questions(tmp_path / "x.json", "docvqa")
    with pytest.raises(SystemExit, match="--benchmark seed needs --annotations"):
        _jsonl(tmp_path / "a.jsonl", [dict(question_id="1", prompt="q", text="A")])
        eval_script.cli(["--benchmark", "seed", "--answers", str(tmp_path / "a.jsonl")])
