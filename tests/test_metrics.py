"""Scorers against hand-worked cases and the official LLaVA-1.5-13B POPE answers."""

import json
from pathlib import Path

import pytest

from nanollava import metrics



@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_k_of_10_table(k, expected):
    # k humans said "2", the rest "3": mean over the 10 leave-one-out subsets of min(1, m/3)
    gts = ["2"] * k + ["3"] * (10 - k)
    assert metrics.vqa_accuracy("2", gts) == pytest.approx(expected)


@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),
    ("two", "2"),
    ("None", "0"),
    ("the cat", "cat"),
    ("A red ball", "red ball"),
    ("dont", "don't"),
    ("Yes!", "yes"),
    ("yes?", "yes"),
    ("black-and-white", "black and white"),   # a mark not touching a space splits words
    ("black - white", "black white"),         # a mark touching a space is deleted
    ("1,000", "1000"),
    ("2.5", "2.5"),                           # a period before a digit is kept
    ("  Tennis\n", "tennis"),
    ("it's red", "it 's red"),
])
def test_normalize_vqa_answer(raw, norm):
    assert metrics.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_normalises_ground_truth_too():
    assert metrics.vqa_accuracy("2 dogs", ["Two dogs."] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("two", ["2"] * 10) == 1.0


def test_gqa_accuracy_strips_period_and_lowercases():
    assert metrics.gqa_accuracy("Left.", "left") == 1.0
    assert metrics.gqa_accuracy("the left", "left") == 0.0


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"),
    ("There is not a dog.", "no"),
    ("No, there is no dog", "no"),
    ("Yes, there is. No doubt.", "yes"),   # only the first sentence counts
    ("Nope", "yes"),                       # the official rule looks for whole words only
])
def test_parse_pope_answer(text, parsed):
    assert metrics.parse_pope_answer(text) == parsed


def test_pope_hand_worked():
    r = metrics.pope(["Yes", "Yes", "No", "No", "Yes"], ["yes", "no", "no", "yes", "yes"])
    # tp=2 fp=1 tn=1 fn=1
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 1, 1)
    assert r["acc"] == pytest.approx(3 / 5)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(3 / 5)


def test_pope_reproduces_llava_v15_13b_numbers(pope_dir):
    read = lambda p: [json.loads(line) for line in open(p)]
    answers = read(pope_dir / "answers_llava-v1.5-13b.jsonl")
    questions = read(pope_dir / "llava_pope_test.jsonl")
    labels = {s: read(pope_dir / f"coco_pope_{s}.json") for s in ("adversarial", "popular", "random")}
    r = metrics.pope_splits(answers, questions, labels)
    assert round(100 * r["adversarial"]["f1"], 2) == 84.46
    assert round(100 * r["popular"]["f1"], 2) == 86.25
    assert round(100 * r["random"]["f1"], 2) == 87.14
    assert round(100 * r["mean_f1"], 2) == 85.95
    assert [r[s]["n"] for s in ("adversarial", "popular", "random")] == [3000, 3000, 2910]


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("C. a cat", "C"), ("The answer is B.", "B"), ("I think The answer is D", "D"),
    ("cat", "FAILED"), ("F", "FAILED"),
])
def test_parse_scienceqa_letter(text, letter):
    assert metrics.parse_scienceqa_letter(text) == letter


def test_parse_mmbench_letter():
    opts = ["teddy bear", "rabbit", "cat", "dog"]
    assert metrics.parse_mmbench_letter("b.", opts) == "B"
    assert metrics.parse_mmbench_letter("So the answer is C.", opts) == "C"
    assert metrics.parse_mmbench_letter("rabbit", opts) == "B"
    assert metrics.parse_mmbench_letter("Spider", opts) is None


def test_multiple_choice_accuracy_plain_and_circular():
    preds = ["A", "B", "C", "A", "D", "D"]
    gold = ["A", "B", "D", "A", "D", "D"]
    assert metrics.multiple_choice_accuracy(preds, gold) == pytest.approx(5 / 6)
    # question 0 has 3 circular rows (one wrong), question 1 has 3 (all right)
    assert metrics.multiple_choice_accuracy(preds, gold, groups=[0, 0, 0, 1, 1, 1]) == 0.5


def test_mme_scores_acc_plus():
    recs = [
        dict(category="existence", image="1.jpg", gt="Yes", pred="Yes"),
        dict(category="existence", image="1.jpg", gt="No", pred="No, there is not."),
        dict(category="existence", image="2.jpg", gt="Yes", pred="Yes"),
        dict(category="existence", image="2.jpg", gt="No", pred="Maybe"),  # "other": wrong
        dict(category="code_reasoning", image="3.png", gt="No", pred="no"),
        dict(category="code_reasoning", image="3.png", gt="Yes", pred="yes"),
    ]
    s = metrics.mme_scores(recs)
    assert s["existence"] == pytest.approx(100 * 3 / 4 + 100 * 1 / 2)
    assert s["code_reasoning"] == pytest.approx(200.0)
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == pytest.approx(200.0)


def test_anls():
    assert metrics.anls("Hello", ["hello"]) == 1.0
    assert metrics.anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert metrics.anls("abc", ["xyz"]) == 0.0                       # 1 - NL = 0 < 0.5
    assert metrics.anls("abcd", ["abxy", "zzzz"]) == 0.5             # 1 - NL exactly 0.5 is kept
    assert metrics.anls("abcd", ["abxyz"]) == 0.0                    # 1 - 3/5 = 0.4 < 0.5
    assert metrics.anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)  # max over gts
    # distances on normalised text, lengths on the raw strings: "Hello " vs "hello" is 1 - 0/6
    assert metrics.anls("  Hello ", ["hello"]) == 1.0 and metrics.anls("hell", ["Hello  "]) == pytest.approx(1 - 1 / 7)


def test_relaxed_accuracy():
    assert metrics.relaxed_accuracy("104", "100") == 1.0
    assert metrics.relaxed_accuracy("106", "100") == 0.0
    assert metrics.relaxed_accuracy("50%", "0.51") == 1.0
    assert metrics.relaxed_accuracy("Paris", "paris") == 1.0
    assert metrics.relaxed_accuracy("0.01", "0") == 0.0   # zero target: exact match


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="labels"):
        metrics.pope(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="ground-truth"):
        metrics.vqa_accuracy("x", [])


def test_exact_match_uses_vqa_normalisation():
    assert metrics.exact_match("A Circle.", "circle") == 1.0
    assert metrics.exact_match("circles", "circle") == 0.0


def test_failed_or_empty_answers_are_wrong_not_yes():
    assert metrics.parse_pope_answer("") is None and metrics.parse_pope_answer("  ") is None
    labels = ["yes", "no", "yes", "no"]
    failed = metrics.pope([None] * 4, labels)                      # every question failed
    assert failed["f1"] == 0.0 and failed["acc"] == 0.0 and failed["yes_ratio"] == 0.0
    assert metrics.pope([""] * 4, labels)["f1"] == 0.0, "the official rule would make this F1 66.67"
    mixed = metrics.pope(["Yes", None, "No", "no"], labels)       # 2 right, 1 failed, 1 wrong
    assert mixed["acc"] == 0.5 and (mixed["tp"], mixed["fp"], mixed["fn"], mixed["tn"]) == (1, 1, 1, 1)
