"""LLaVA JSON dataset, truncation, collate, the modality-grouped sampler and data_prep.py."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import data_prep
from nanollava import conversation, data
from nanollava.config import LLaVAConfig, VisionConfig
from nanollava.conversation import IGNORE_INDEX, SHORT_ANSWER
from nanollava.data import LLaVADataset, collate, global_batches, open_image, rank_micro_batches, truncate
from nanollava.tokenizer import Tokenizer, train_bpe

N_IMG = 4                                                        # (28 // 14) ** 2 visual tokens
CONFIG = LLaVAConfig(vision=VisionConfig(image_size=28, patch_size=14), image_aspect_ratio="pad")
WORDS = "what color is the shape a red blue circle yes no describe image left right two".split()


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [conversation.SYSTEM_USER, "USER: ASSISTANT:", SHORT_ANSWER, " ".join(WORDS)]
    train_bpe(texts, vocab_size=200).tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer.from_file(tok_path)


def good_records():
    return [
        dict(id="one", image="a.png", conversations=[human("<image>\nwhat color is the shape?"), gpt("red"),
                                                      human("is the shape a circle?"), gpt("yes")]),
        dict(id="text", conversations=[human("describe two shapes"), gpt("a red circle")]),
        dict(id="two", image=["a.png", "sub/b.png"],
             conversations=[human("left <image> right <image> what color"), gpt("blue")]),
    ]


def bad_records():
    """(record, reason data_prep reports) for every kind of bad input."""
    return [
        (dict(id="missing", image="nope.png", conversations=[human("<image>\nwhat"), gpt("red")]),
         "missing image file"),
        (dict(id="corrupt", image="corrupt.png", conversations=[human("<image>\nwhat"), gpt("red")]),
         "unreadable/corrupt image"),
        (dict(id="empty-file", image="empty.png", conversations=[human("<image>\nwhat"), gpt("red")]),
         "zero-size image"),
        (dict(id="escape", image="../outside.png", conversations=[human("<image>\nwhat"), gpt("red")]),
         "image path escapes the folder"),
        (dict(id="noconv", image="a.png"), "no conversations"),
        (dict(id="order", conversations=[human("what"), human("red")]), "turns not alternating human/gpt"),
        (dict(id="gptfirst", conversations=[gpt("red"), human("what")]), "turns not alternating human/gpt"),
        (dict(id="tag-no-image", conversations=[human("<image>\nwhat"), gpt("red")]), "<image> without an image"),
        (dict(id="image-no-tag", image="a.png", conversations=[human("what"), gpt("red")]),
         "image without <image>"),
        (dict(id="more-tags", image="a.png", conversations=[human("<image> <image> what"), gpt("red")]),
         "more <image> tags than images"),
        (dict(id="empty-reply", image="a.png", conversations=[human("<image>\nwhat"), gpt("  ")]),
         "empty assistant reply"),
    ]


@pytest.fixture()
def folder(tmp_path):
    imgs = tmp_path / "images"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(imgs / "a.png")
    Image.new("RGBA", (20, 50), (0, 0, 255, 128)).save(imgs / "sub" / "b.png")
    (imgs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (imgs / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    return tmp_path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


# --- dataset ---

def test_dataset_expands_images_and_builds_labels(folder, tok):
    ds = LLaVADataset(write_json(folder / "d.json", good_records()), str(folder / "images"), tok, CONFIG,
                      template="vicuna_v1", max_length=512)
    one, text, two = ds[0], ds[1], ds[2]
    assert (one["input_ids"] == tok.image_token_id).sum() == N_IMG
    assert one["pixel_values"].shape == (1, 3, 28, 28) and one["image_sizes"] == [(30, 40)]
    assert text["pixel_values"] is None and text["image_sizes"] == []
    assert (two["input_ids"] == tok.image_token_id).sum() == 2 * N_IMG
    assert two["pixel_values"].shape == (2, 3, 28, 28) and two["image_sizes"] == [(30, 40), (50, 20)]
    sup = one["labels"][one["labels"] != IGNORE_INDEX].tolist()
    assert sup == tok.encode("red") + [tok.eos_id] + tok.encode("yes") + [tok.eos_id]
    assert ds.skipped == {}


def test_bad_record_is_skipped_with_a_warning_and_counted(folder, tok):
    records = [bad_records()[0][0]] + good_records()
    ds = LLaVADataset(write_json(folder / "d.json", records), str(folder / "images"), tok, CONFIG, "vicuna_v1")
    with pytest.warns(UserWarning, match="record 0 .id missing.: image file not found"):
        sample = ds[0]
    assert sample["image_sizes"] == [(30, 40)], "returned the next good record"
    assert ds.skipped["FileNotFoundError"] == 1


def test_truncation_keeps_whole_images_and_drops_samples_whose_image_cannot_fit(folder, tok):
    rec = dict(id="t", image=["a.png", "a.png"],
               conversations=[human("<image> what color <image>"), gpt("red blue circle yes no")])
    path = write_json(folder / "d.json", [rec, good_records()[1]])
    full = LLaVADataset(path, str(folder / "images"), tok, CONFIG, "vicuna_v1", max_length=10_000)[0]
    ids = full["input_ids"].tolist()
    first = ids.index(tok.image_token_id)
    second = first + N_IMG + ids[first + N_IMG:].index(tok.image_token_id)
    # a limit that falls inside the 2nd image: cut before it, keep 1 image
    ds = LLaVADataset(path, str(folder / "images"), tok, CONFIG, "vicuna_v1", max_length=second + 2)
    with pytest.warns(UserWarning, match="losing every supervised token"):
        ds[0]           # nothing supervised before the 2nd image -> dropped, next record returned
    assert sum(ds.skipped.values()) == 1
    # a limit inside the first image: the sample cannot be used (both records too long here)
    ds = LLaVADataset(path, str(folder / "images"), tok, CONFIG, "vicuna_v1", max_length=first + 2)
    with pytest.raises(ValueError, match="splitting its first image"):
        ds.load(0)
    with pytest.warns(UserWarning, match="max_length"), pytest.raises(RuntimeError, match="no usable record"):
        ds[0]
    assert sum(ds.skipped.values()) == 2
    # supervised text before the 2nd image: kept with one image
    rec2 = dict(id="t2", image=["a.png", "a.png"],
                conversations=[human("<image> what"), gpt("red"), human("<image> color"), gpt("blue")])
    path2 = write_json(folder / "e.json", [rec2])
    ids2 = LLaVADataset(path2, str(folder / "images"), tok, CONFIG, "vicuna_v1")[0]["input_ids"].tolist()
    start2 = [j for j in range(1, len(ids2)) if ids2[j] == tok.image_token_id != ids2[j - 1]][1]
    s = LLaVADataset(path2, str(folder / "images"), tok, CONFIG, "vicuna_v1", max_length=start2 + 1)[0]
    assert s["pixel_values"].shape[0] == 1 and len(s["image_sizes"]) == 1
    assert (s["input_ids"] == tok.image_token_id).sum() == N_IMG and len(s["input_ids"]) == start2


@settings(max_examples=25, deadline=None)
@given(layout=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=4),
       max_length=st.integers(1, 40))
def test_truncate_never_splits_an_image(layout, max_length):
    IMG = 99
    ids, labels = [], []
    for n_text, n_img in layout:                     # text (supervised), then an image run
        ids += list(range(1, n_text + 1)) + [IMG] * n_img
        labels += list(range(1, n_text + 1)) + [IGNORE_INDEX] * n_img
    ids += [7]
    labels += [7]
    counts = [k for _, k in layout]
    out = truncate(ids, labels, IMG, max_length, counts)
    first_start = layout[0][0]
    if out is None:
        splits_first = first_start < max_length < first_start + counts[0]
        nothing_supervised = all(lab == IGNORE_INDEX for lab in labels[:max_length])
        assert splits_first or nothing_supervised or max_length < len(ids), "dropped for no reason"
        return
    t_ids, t_labels, n = out
    assert len(t_ids) <= max_length and t_ids == ids[:len(t_ids)] and t_labels == labels[:len(t_ids)]
    starts, at = [], 0
    for n_text, n_img in layout:
        starts.append(at + n_text)
        at += n_text + n_img
    assert len(t_ids) == min(len(ids), max_length) or len(t_ids) in starts, "cut only at image starts"
    assert t_ids.count(IMG) == sum(counts[:n]), "every kept image is whole"
    assert any(lab != IGNORE_INDEX for lab in t_labels)


def test_collate_right_pads_and_stacks_images(folder, tok):
    ds = LLaVADataset(write_json(folder / "d.json", good_records()), str(folder / "images"), tok, CONFIG, "vicuna_v1")
    batch = collate([ds[0], ds[1], ds[2], None], pad_id=tok.pad_id)
    B, T = batch["input_ids"].shape
    lens = [len(ds[i]["input_ids"]) for i in range(3)]
    assert B == 3 and T == max(lens)
    for r, n in enumerate(lens):
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (T - n)
        assert (batch["input_ids"][r, n:] == tok.pad_id).all() and (batch["labels"][r, n:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    assert batch["image_sizes"].tolist() == [[30, 40], [30, 40], [50, 20]]
    text_only = collate([ds[1]], pad_id=tok.pad_id)
    assert text_only["pixel_values"] is None and text_only["image_sizes"] is None


def test_dataloader_with_workers_decodes_images_in_workers(folder, tok):
    ds = LLaVADataset(write_json(folder / "d.json", good_records()), str(folder / "images"), tok, CONFIG, "vicuna_v1")
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1,
                                     collate_fn=lambda b: collate(b, tok.pad_id))
    assert sum(b["input_ids"].shape[0] for b in dl) == 3


# --- global batches ---

def test_global_batches_are_a_deterministic_permutation_without_the_partial_last_batch():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10, 11]
    for group in (True, False):
        batches = global_batches(lengths, 2, seed=1, group_by_length=group)
        flat = [i for b in batches for i in b]
        assert len(batches) == 5 and all(len(b) == 2 for b in batches) and len(set(flat)) == 10
        assert batches == global_batches(lengths, 2, seed=1, group_by_length=group)
        assert global_batches([-n for n in lengths], 2, seed=1, group_by_length=group) == batches
        assert global_batches(lengths, 2, seed=1, epoch=1, group_by_length=group) != batches


def test_global_batches_group_modalities_and_sort_by_length():
    lengths = [10 + i if i % 3 else -(10 + i) for i in range(40)]
    batches = global_batches(lengths, 4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(40))
    for b in batches[:-2]:                           # the last batches hold the two leftovers
        assert len({lengths[i] > 0 for i in b}) == 1, "a global batch mixes modalities"
        assert [abs(lengths[i]) for i in b] == sorted((abs(lengths[i]) for i in b), reverse=True)


@pytest.mark.parametrize("world, micro", [(1, 2), (1, 8), (2, 4), (3, 2), (3, 8), (4, 3)])
def test_ranks_split_each_global_batch_into_the_same_samples_whatever_the_world_size(world, micro):
    """A global batch is a fixed set of samples: the ranks' micro-batches are exactly its samples,
    every rank gets the same number of micro-batches, and the k-th micro-batches of the ranks hold
    neighbouring samples of the length-sorted batch (they wait for each other)."""
    lengths = [(7 * i) % 23 + 1 for i in range(60)]
    for batch in global_batches(lengths, 24, seed=3):
        shares = [rank_micro_batches(batch, world, r, micro) for r in range(world)]
        assert sorted(i for s in shares for m in s for i in m) == sorted(batch)
        assert {len(s) for s in shares} == {24 // (world * micro)} and all(len(m) == micro for s in shares for m in s)
        kth = [i for k in range(len(shares[0])) for s in shares for i in s[k]]
        assert kth == batch, "the ranks' k-th micro-batches should take the batch in order"


def test_dataset_lengths_come_from_the_index(folder, tok, capsys):
    write_json(folder / "raw.json", good_records())
    data_prep.main(["--json", str(folder / "raw.json"), "--image-folder", str(folder / "images"),
                    "--out", str(folder / "out"), "--tokenizer", tok_path_of(tok, folder), "--workers", "1"])
    ds = LLaVADataset(str(folder / "out" / "raw.json"), str(folder / "images"), tok, CONFIG, "vicuna_v1")
    exact = [len(ds[i]["input_ids"]) for i in range(3)]
    assert ds.lengths == [exact[0], -exact[1], exact[2]]


def tok_path_of(tok, folder):
    path = folder / "tokenizer.json"
    tok.tok.save(str(path))
    return str(path)


# --- data_prep.py ---

def test_data_prep_reports_every_bad_input(folder, tok, capsys):
    bad = bad_records()
    long = dict(id="long", image="a.png", conversations=[human("<image>\n" + "what " * 5), gpt("red " * 60)])
    too_long = dict(id="toolong", image="a.png", conversations=[human("what " * 80 + "<image>"), gpt("red")])
    records = good_records() + [r for r, _ in bad] + [long, too_long]
    write_json(folder / "raw.json", records)
    data_prep.main(["--json", str(folder / "raw.json"), "--image-folder", str(folder / "images"),
                    "--out", str(folder / "out"), "--tokenizer", tok_path_of(tok, folder),
                    "--max-length", "100", "--num-image-tokens", str(N_IMG), "--workers", "1"])
    printed = capsys.readouterr().out
    assert "4 good (1 will be truncated), 11 broken, 1 skipped" in printed
    report = (folder / "out" / "raw.report.txt").read_text().splitlines()
    by_id = {line.split("\t")[1].split("(id ")[1].rstrip(")"): line.split("\t") for line in report}
    for rec, reason in bad:
        status, _, got, msg = by_id[rec["id"]]
        assert status == "broken" and got == reason, (rec["id"], got, msg)
    assert by_id["missing"][3].endswith("nope.png") and "corrupt.png" in by_id["corrupt"][3]
    assert by_id["long"][0] == "truncated" and by_id["toolong"][0] == "skipped"
    clean = json.loads((folder / "out" / "raw.json").read_text())
    assert [r["id"] for r in clean] == ["one", "text", "two", "long"]
    index = json.loads((folder / "out" / "raw.index.json").read_text())
    assert [r["n_images"] for r in index["records"]] == [1, 0, 2, 1]


def test_data_prep_malformed_json_names_line_and_column(folder):
    (folder / "broken.json").write_text('[{"id": 1,\n  "conversations": [}]')
    with pytest.raises(SystemExit, match=r"broken.json: malformed JSON at line 2 column 21"):
        data_prep.main(["--json", str(folder / "broken.json"), "--image-folder", str(folder / "images"),
                        "--out", str(folder / "out")])


def test_data_prep_missing_image_folder_is_a_clear_error(folder):
    write_json(folder / "raw.json", good_records())
    with pytest.raises(SystemExit, match="image folder not found"):
        data_prep.main(["--json", str(folder / "raw.json"), "--image-folder", str(folder / "nope"),
                        "--out", str(folder / "out")])


def test_toy_captions_agree_with_every_question_of_the_image():
    import easy_vqa
    qs, answers, ids = easy_vqa.get_test_questions()
    by_image = data_prep._per_image(qs, answers, ids)
    for i, qa in list(by_image.items())[:300]:
        shape, color = data_prep._shape_and_color(qa)
        for q, a in qa:
            words = q.rstrip("?").split()
            if a not in ("yes", "no"):
                continue
            negated = "not" in words or "no" in words
            for w, known in ((s, shape) for s in data_prep.SHAPES if s in words):
                if known:
                    assert ((a == "yes") != negated) == (w == known), (i, q, a, shape)
            for w, known in ((c, color) for c in data_prep.COLORS if c in words):
                if known:
                    assert ((a == "yes") != negated) == (w == known), (i, q, a, color)


def test_toy_build_is_deterministic_and_loads(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    data_prep.main(["--out", str(a), "--limit", "30", "--seed", "3"])
    data_prep.main(["--out", str(b), "--limit", "30", "--seed", "3"])
    for name in ("stage1.json", "stage2.json", "eval_questions.jsonl", "eval_answers.jsonl", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = Tokenizer.from_file(str(a / "tokenizer.json"))
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.pad_id == 0 and tok.image_token_id == 4
    s2 = LLaVADataset(str(a / "stage2.json"), str(a / "images"), tok, CONFIG, "vicuna_v1")
    sample = s2[0]
    assert (sample["input_ids"] == tok.image_token_id).sum() == N_IMG
    first = json.loads((a / "stage2.json").read_text())[0]["conversations"]
    assert first[0]["value"].startswith("<image>\n") and first[0]["value"].endswith("\n" + SHORT_ANSWER)
    s1 = LLaVADataset(str(a / "stage1.json"), str(a / "images"), tok, CONFIG, "plain")
    assert tok.eos_id not in s1[0]["input_ids"].tolist()
    q = json.loads((a / "eval_questions.jsonl").read_text().splitlines()[0])
    assert set(q) == {"question_id", "image", "text", "category"} and q["category"] in ("yesno", "open")
    assert os.path.isfile(a / "images" / q["image"])
    assert tok.unk_id not in tok.encode(q["text"]), "the toy tokenizer covers the eval questions"


# --- faults: one bad item is a counted skip, never a dead run; outputs are never torn ---

def png_header(path, width, height):
    """A PNG that only claims a size: IHDR, no pixel data. Decoding it fails, so an error that
    names the size proves the check ran on the header, before any pixel was allocated."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_image_guards_bound_pixels_and_aspect_ratio_from_the_header(folder, tok):
    imgs = folder / "images"
    png_header(imgs / "strip.png", 30000, 1)                 # 169 bytes that would cost GiBs in pad mode
    png_header(imgs / "huge.png", 20000, 20000)              # over PIL's own decompression-bomb limit
    png_header(imgs / "wide.png", 9000, 8000)                # fine as w*h, but its pad square is 81 M pixels
    Image.new("L", (30000, 1)).save(imgs / "real_strip.png")
    with pytest.raises(ValueError, match=r"too thin: 30000x1 \(aspect ratio 30000:1, limit 50:1\)"):
        open_image(str(imgs / "strip.png"))
    with pytest.raises(ValueError, match=r"too large"):
        open_image(str(imgs / "huge.png"))
    with pytest.raises(ValueError, match=r"too large: 9000x8000 \(9000x9000 = 81,000,000 pixels"):
        open_image(str(imgs / "wide.png"))
    records = [dict(id=n, image=f"{n}.png", conversations=[human("<image>\nwhat"), gpt("red")])
               for n in ("strip", "huge", "real_strip")] + good_records()
    ds = LLaVADataset(write_json(folder / "d.json", records), str(imgs), tok, CONFIG, "vicuna_v1")
    with pytest.warns(UserWarning, match="skipping record"):
        sample = ds[0]
    assert sample["image_sizes"] == [(30, 40)] and sample["skipped"] == {"ValueError": 2, "ImageTooLarge": 1}
    assert ds.skipped == {"ValueError": 2, "ImageTooLarge": 1}


def test_memory_error_while_decoding_is_a_counted_skip(folder, tok, monkeypatch):
    from nanollava import data
    real = data.open_image

    def out_of_memory(path):
        if path.endswith("b.png"):
            raise MemoryError
        return real(path)
    monkeypatch.setattr(data, "open_image", out_of_memory)
    ds = LLaVADataset(write_json(folder / "d.json", good_records()), str(folder / "images"), tok, CONFIG,
                      "vicuna_v1")
    with pytest.warns(UserWarning, match=r"record 2 \(id two\): MemoryError"):
        sample = ds[2]
    assert sample["image_sizes"] == [(30, 40)] and ds.skipped == {"MemoryError": 1}
    assert collate([ds[1], sample], tok.pad_id)["skipped"] == {"MemoryError": 1}, "collate sums the skips"


def test_lone_surrogate_is_a_clear_error_and_a_counted_skip(folder, tok):
    with pytest.raises(ValueError, match=r"not valid Unicode: lone surrogate '\\udcff' at character 4"):
        tok.encode("red \udcff")
    rec = json.loads('{"id": "s", "conversations": [{"from": "human", "value": "what \\udcff"},'
                     ' {"from": "gpt", "value": "red"}]}')                # valid JSON, not Unicode text
    ds = LLaVADataset(write_json(folder / "d.json", [rec] + good_records()), str(folder / "images"), tok,
                      CONFIG, "vicuna_v1")
    with pytest.warns(UserWarning, match="turn 0: text is not valid Unicode"):
        sample = ds[0]
    assert sample["skipped"] == {"ValueError": 1}


def test_literal_special_tokens_in_data_text_stay_text(folder, tok):
    assert not {tok.eos_id, tok.bos_id, tok.token_to_id("<pad>")} & set(tok.encode("a </s> b <s> c <pad>"))
    rec = dict(id="x", conversations=[human("say </s> please"), gpt("a </s> b")])
    s = LLaVADataset(write_json(folder / "d.json", [rec]), str(folder / "images"), tok, CONFIG, "vicuna_v1")[0]
    assert s["input_ids"].tolist().count(tok.eos_id) == 1, "only the real end of the reply is </s>"
    assert s["labels"].tolist()[-1] == tok.eos_id


def test_too_many_bad_records_in_a_row_stop_with_one_line(folder, tok):
    bad = [dict(id=i, image="nope.png", conversations=[human("<image>\nwhat"), gpt("red")]) for i in range(100)]
    ds = LLaVADataset(write_json(folder / "d.json", good_records()[:1] + bad), str(folder / "images"), tok,
                      CONFIG, "vicuna_v1")
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match=r"no usable record in 64 in a row"):
        ds[1]


def test_wrong_image_folder_fails_before_any_record_is_read(folder, tok):
    (folder / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the first 3 images .* is in the image folder"):
        LLaVADataset(write_json(folder / "d.json", good_records()), str(folder / "elsewhere"), tok, CONFIG)


def test_data_prep_lone_surrogate_is_reported_and_outputs_stay_valid_json(folder, tok, capsys):
    raw = '[{"id": "bad\\udcff", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", ' \
          '"value": "red"}]}, {"id": "s", "conversations": [{"from": "human", "value": "x \\ud800"}, ' \
          '{"from": "gpt", "value": "red"}]}]'
    records = good_records()
    (folder / "raw.json").write_text(json.dumps(records)[:-1] + ", " + raw[1:])
    data_prep.main(["--json", str(folder / "raw.json"), "--image-folder", str(folder / "images"),
                    "--out", str(folder / "out"), "--tokenizer", tok_path_of(tok, folder), "--workers", "1"])
    assert "3 good (0 will be truncated), 2 broken" in capsys.readouterr().out
    assert [r["id"] for r in json.loads((folder / "out" / "raw.json").read_text())] == ["one", "text", "two"]
    report = (folder / "out" / "raw.report.txt").read_text()
    assert "cannot be written as UTF-8 JSON" in report and "text is not valid Unicode" in report


def test_data_prep_write_failure_keeps_the_previous_outputs(folder, tok):
    """A real OS write error (the file size limit, as a full disk would): the previous X.json,
    X.index.json and X.report.txt stay as they were and no .tmp is left."""
    import resource
    import signal
    write_json(folder / "raw.json", good_records() * 20)
    argv = ["--json", str(folder / "raw.json"), "--image-folder", str(folder / "images"), "--out",
            str(folder / "out"), "--workers", "1"]
    data_prep.main(argv)
    before = {p.name: p.read_bytes() for p in (folder / "out").iterdir()}
    write_json(folder / "raw.json", good_records() * 30)
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old_limit[1]))
    try:
        with pytest.raises(SystemExit, match=r"error: cannot write .*raw.json: File too large"):
            data_prep.main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert {p.name: p.read_bytes() for p in (folder / "out").iterdir()} == before


def test_data_prep_deeply_nested_json_is_a_clear_error(folder):
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit, match=r"deep.json: JSON nested too deeply"):
        data_prep.main(["--json", str(folder / "deep.json"), "--image-folder", str(folder / "images"),
                        "--out", str(folder / "out")])
