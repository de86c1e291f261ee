"""POPE: parsers, metrics, loaders and the question builder on crafted inputs (no downloads)."""

from __future__ import annotations

import json

import pytest

from veridical.errors import InputError
from veridical.evals import pope

# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("text", "official", "opera"),
    [
        ("Yes, there is a dog.", "yes", "yes"),
        ("No, there is no dog.", "no", "no"),
        ("No.", "no", "no"),
        ("no", "no", "no"),
        ("There is no dog in the image.", "no", "no"),
        ("There is not a dog.", "no", "no"),
        # "n't" is a negation only for OPERA's parser.
        ("There isn't a dog.", "yes", "no"),
        ("I don't see one", "yes", "no"),
        # Upper-case NO only for OPERA.
        ("NO", "yes", "no"),
        # First-sentence cut: the official parser ignores everything after the first '.'.
        ("Yes. But there is no cat.", "yes", "no"),
        # Commas are dropped, so "no," is the word "no".
        ("no, never", "no", "no"),
        # Words, not substrings: "nothing" / "Nope" are not negations.
        ("Nothing suggests otherwise", "yes", "yes"),
        ("Nope", "yes", "yes"),
        # Split on single spaces only: a newline glues words together.
        ("Yes\nno", "yes", "yes"),
        ("", "yes", "yes"),
    ],
)
def test_parsers(text, official, opera):
    assert pope.parse_answer(text) == official
    assert pope.parse_answer(text, "pope") == official
    assert pope.parse_answer(text, "opera") == opera


def test_parser_registry_did_you_mean():
    assert pope.available_parsers() == ["opera", "pope"]
    with pytest.raises(InputError, match="did you mean 'pope'"):
        pope.get_parser("popee")
    with pytest.raises(InputError, match="did you mean 'opera'.*available: opera, pope"):
        pope.get_parser("OPERA")
    with pytest.raises(ValueError, match="already registered"):
        pope.register_parser("pope")(lambda t: "yes")


# --------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "yes", "no", "no", "yes", "yes"]
    # TP = 3 (items 0, 2, 7), FN = 1 (1), FP = 2 (3, 6), TN = 2 (4, 5)
    m = pope.pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 1, 2, 2, 8)
    assert m["accuracy"] == 5 / 8
    assert m["precision"] == 3 / 5
    assert m["recall"] == 3 / 4
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["yes_ratio"] == 5 / 8  # from predictions, not from labels


def test_metrics_zero_denominators_and_per_item():
    m = pope.pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert [pope.confusion(p, lab) for p, lab in [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes")]] == [
        "tp", "fp", "tn", "fn"]
    with pytest.raises(ValueError):
        pope.confusion("maybe", "yes")
    with pytest.raises(ValueError, match="pair up"):
        pope.pope_metrics(["yes"], ["yes", "no"])


# --------------------------------------------------------------------------- files


QUESTIONS = [
    {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
    {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
    {"question_id": 4, "image": "b.jpg", "text": "Is there an apple in the image?", "label": "no"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_json_lines_and_json_array_give_the_same_records(tmp_path):
    lines = pope.load_questions(_jsonl(tmp_path / "coco_pope_random.json", QUESTIONS))
    array_path = tmp_path / "aokvqa_pope_popular.json"
    array_path.write_text(json.dumps(QUESTIONS, indent=1))
    array = pope.load_questions(array_path)
    assert lines.records == array.records == QUESTIONS
    assert lines.locations[2] == "line 3" and array.locations[2] == "item 3"


def test_score_matches_by_id_by_order_and_per_split(tmp_path):
    q_random = _jsonl(tmp_path / "coco_pope_random.json", QUESTIONS)
    q_adv = _jsonl(tmp_path / "coco_pope_adversarial.json", QUESTIONS)
    # By question_id, shuffled: answers yes, "There isn't", No, "Yes" -> preds yes, yes, no, yes
    a_random = _jsonl(tmp_path / "ans_random.jsonl", [
        {"question_id": 3, "text": "No, there is no car."},
        {"question_id": 1, "text": "Yes, a dog."},
        {"question_id": 4, "text": "Yes"},
        {"question_id": 2, "text": "There isn't a cat."},
    ])
    # By line order (POPE README format, key "answer"): all correct.
    a_adv = _jsonl(tmp_path / "ans_adv.jsonl", [
        {"question": "q", "answer": "Yes"}, {"question": "q", "answer": "No"},
        {"question": "q", "answer": "yes."}, {"question": "q", "answer": "no"},
    ])
    result = pope.score_files([q_random, q_adv], [a_random, a_adv])
    rnd, adv = result["splits"]["random"], result["splits"]["adversarial"]
    # random: labels y n y n, preds y y n y -> TP 1, FP 2, FN 1, TN 0
    assert (rnd["tp"], rnd["fp"], rnd["fn"], rnd["tn"]) == (1, 2, 1, 0)
    assert rnd["accuracy"] == 0.25 and rnd["precision"] == 1 / 3 and rnd["recall"] == 0.5
    assert rnd["yes_ratio"] == 0.75
    assert adv["accuracy"] == 1.0 and adv["f1"] == 1.0
    overall = result["overall"]
    assert overall["n"] == 8 and overall["accuracy"] == 5 / 8
    assert result["mean"]["accuracy"] == (0.25 + 1.0) / 2
    assert list(result["splits"]) == ["random", "adversarial"]
    assert result["unanswered"] == 0 and result["skipped_lines"] == 0
    # The opera parser reads "There isn't" as no -> one more TN.
    assert pope.score_files([q_random], [a_random], parser="opera")["splits"]["random"]["tn"] == 1


def test_category_field_sets_the_split(tmp_path):
    qs = [dict(q, category="popular" if q["question_id"] < 3 else "random") for q in QUESTIONS]
    answers = [{"question_id": q["question_id"], "text": q["label"]} for q in QUESTIONS]
    result = pope.score(qs, answers)
    assert list(result["splits"]) == ["random", "popular"]
    assert result["overall"]["accuracy"] == 1.0


def test_answer_matching_errors(tmp_path):
    qpath = _jsonl(tmp_path / "coco_pope_random.json", QUESTIONS)
    qs = pope.load_questions(qpath)
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"question_id": 1, "text": "yes"}, {"text": "no"}])
    with pytest.raises(InputError, match=r"mixed.jsonl, line 2: no question_id"):
        pope.match_answers(qs, pope.load_answers(mixed))
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"question_id": 99, "text": "yes"}])
    with pytest.raises(InputError, match=r"unknown.jsonl, line 1: question_id 99 is not in"):
        pope.match_answers(qs, pope.load_answers(unknown))
    short = _jsonl(tmp_path / "short.jsonl", [{"text": "yes"}])
    with pytest.raises(InputError, match="matched by line order"):
        pope.match_answers(qs, pope.load_answers(short))
    dup = _jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 1, "text": "no"}])
    with pytest.raises(InputError, match=r"dup.jsonl, line 2: question_id 1 repeats line 1"):
        pope.load_answers(dup)
    # Unanswered questions: an error, or with the skip flag scored without them and counted.
    partial = _jsonl(tmp_path / "partial.jsonl", [{"question_id": "1", "text": "yes"},
                                                  {"question_id": 2, "text": "no"}])
    with pytest.raises(InputError, match=r"2 questions .* have no answer .*\[3, 4\]"):
        pope.score_files([qpath], [partial])
    result = pope.score_files([qpath], [partial], skip_bad_lines=True)
    assert result["unanswered"] == 2 and result["overall"]["n"] == 2
    with pytest.raises(InputError, match="one answer file per question file"):
        pope.score_files([qpath, qpath], [partial])


def test_malformed_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    path = tmp_path / "coco_pope_popular.json"
    lines = [json.dumps(q) for q in QUESTIONS]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"question_id": 9, "image": "c.jpg", "text": "Is there?", "label": "maybe"}))
    lines.insert(5, json.dumps({"question_id": 10, "image": "c.jpg", "label": "no"}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"coco_pope_popular.json, line 3: invalid JSON"):
        pope.load_questions(path)
    loaded = pope.load_questions(path, skip_bad_lines=True)
    assert loaded.skipped == 3 and len(loaded) == 4
    assert any("line 5: 'label' must be 'yes' or 'no'" in p for p in loaded.problems)
    assert any("line 6: missing key 'text'" in p for p in loaded.problems)
    # Not an object / duplicate ids / broken arrays.
    bad = tmp_path / "bad.json"
    bad.write_text('["a string"]')
    with pytest.raises(InputError, match=r"bad.json, item 1: expected a JSON object"):
        pope.load_questions(bad)
    bad.write_text('[{"question_id": 1,\n "image": }]')
    with pytest.raises(InputError, match=r"bad.json, line 2: invalid JSON array"):
        pope.load_questions(bad)
    dup = _jsonl(tmp_path / "dup.json", [QUESTIONS[0], QUESTIONS[0]])
    with pytest.raises(InputError, match="repeats line 1"):
        pope.load_questions(dup)
    with pytest.raises(InputError, match="does not exist"):
        pope.load_questions(tmp_path / "missing.json")
    # An answer without text.
    no_text = _jsonl(tmp_path / "ans.jsonl", [{"question_id": 1, "response": "yes"}])
    with pytest.raises(InputError, match=r"ans.jsonl, line 1: no answer text"):
        pope.load_answers(no_text)


def test_split_from_filename():
    assert pope.split_from_filename("output/coco/coco_pope_adversarial.json") == "adversarial"
    assert pope.split_from_filename("gqa_pope_popular.json") == "popular"
    assert pope.split_from_filename("my_questions.jsonl") == "my_questions"


def test_parquet_with_lmms_lab_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["0", "1", "2"],
        "question_id": ["1", "2", "3"],
        "question": ["Is there a dog in the image?", "Is there a cat in the image?",
                     "Is there a car in the image?"],
        "answer": ["yes", "No", "yes"],
        "image_source": ["COCO_val2014_000000000001", "COCO_val2014_000000000001",
                         "COCO_val2014_000000000002"],
        "image": [{"bytes": b"\x89PNG-1", "path": None}, {"bytes": b"\x89PNG-1", "path": None},
                  {"bytes": b"\x89PNG-2", "path": None}],
        "category": ["adversarial", "adversarial", "random"],
    })
    path = tmp_path / "pope.parquet"
    pq.write_table(table, path)
    loaded = pope.load_parquet_questions(path, cache_dir=str(tmp_path / "cache"))
    assert [r["question_id"] for r in loaded] == [1, 2, 3]
    assert [r["label"] for r in loaded] == ["yes", "no", "yes"]
    assert loaded.records[1]["image"] == "COCO_val2014_000000000001"
    assert loaded.image_bytes(loaded.records[2]) == b"\x89PNG-2"
    adv = pope.load_parquet_questions(path, split="adversarial", cache_dir=str(tmp_path / "cache"))
    assert len(adv) == 2
    with pytest.raises(InputError, match="split 'popular' not in"):
        pope.load_parquet_questions(path, split="popular", cache_dir=str(tmp_path / "cache"))
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": t} for i, t in
                                            [(1, "Yes"), (2, "Yes"), (3, "No")]])
    result = pope.score_files([path], [answers])
    assert result["splits"]["adversarial"]["accuracy"] == 0.5
    assert result["splits"]["random"]["accuracy"] == 0.0
    with pytest.raises(InputError, match="no parquet file"):
        pope.load_parquet_questions(tmp_path / "nope.parquet")
    # question ids restarting per category: the global "id" column keys the questions
    pq.write_table(table.set_column(1, "question_id", pa.array(["1", "2", "1"])), tmp_path / "r.parquet")
    again = pope.load_parquet_questions(tmp_path / "r.parquet", cache_dir=str(tmp_path / "cache"))
    assert [r["question_id"] for r in again] == [0, 1, 2]
    assert [r["source_question_id"] for r in again] == ["1", "2", "1"]


# --------------------------------------------------------------------------- builder

CATEGORY_NAMES = ["person", "dog", "car", "cat", "apple", "bus", "chair", "cup", "umbrella",
                  "bench", "oven", "tv"]


def coco_instances(images: dict[int, list[str]]) -> dict:
    """A tiny COCO instances dict: image id -> category names in annotation order."""
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(CATEGORY_NAMES)]
    cid = {n: i + 1 for i, n in enumerate(CATEGORY_NAMES)}
    anns, aid = [], 1
    for image_id, names in images.items():
        for n in names:
            anns.append({"id": aid, "image_id": image_id, "category_id": cid[n], "bbox": [0, 0, 1, 1],
                         "area": 1.0, "iscrowd": 0})
            aid += 1
    imgs = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 10, "height": 10}
            for i in images]
    return {"images": imgs, "annotations": anns, "categories": cats}


IMAGES = {
    1: ["person", "dog", "person", "car"],  # distinct: person, dog, car
    2: ["person", "car", "bus", "cup"],
    3: ["dog", "cat", "chair", "person"],
    4: ["person", "cup", "chair", "tv"],
    5: ["bus", "car", "person", "bench"],
    6: ["apple", "umbrella", "oven"],
    7: ["cat", "dog", "chair"],
    8: ["tv", "chair"],  # only 2 objects: never sampled with per_image=3
    9: ["person", "dog", "cat", "car", "bench"],
    10: [],
}


def test_image_objects_keep_first_annotation_order():
    objs = {o["image_id"]: o for o in pope.image_objects(coco_instances(IMAGES))}
    assert objs[1]["objects"] == ["person", "dog", "car"]
    assert objs[1]["image"] == "COCO_val2014_000000000001.jpg"
    assert objs[10]["objects"] == []


@pytest.mark.parametrize("split", pope.SPLITS)
def test_builder_definitions(split):
    instances = coco_instances(IMAGES)
    qs = pope.build_questions(instances, split, num_images=6, per_image=3, seed=3)
    present = {o["image"]: o["objects"] for o in pope.image_objects(instances)}
    assert len(qs) == 6 * 6
    assert [q["question_id"] for q in qs] == list(range(1, 37))
    assert sum(q["label"] == "yes" for q in qs) == len(qs) // 2
    assert {q["image"] for q in qs} <= {im for im, o in present.items() if len(o) >= 3}
    sampled = []
    for start in range(0, len(qs), 6):
        group = qs[start:start + 6]
        image = group[0]["image"]
        assert all(q["image"] == image for q in group)
        objs = [q["text"][len("Is there a"):].removeprefix("n ").removesuffix(" in the image?").strip()
                for q in group]
        assert [q["label"] for q in group] == ["yes", "no"] * 3
        assert objs[0::2] == present[image][:3]  # positives: the first three objects
        negatives = objs[1::2]
        assert not set(negatives) & set(present[image])  # never in the image
        assert len(set(objs)) == 6  # never asked twice for one image
        sampled.append((image, objs))
    images = [present[im] for im, _ in sampled]
    counts = pope.object_counts([{"objects": o} for o in images])
    co = pope.co_occurrence([{"objects": o} for o in images])
    for image, objs in sampled:
        for k in range(3):
            pos, neg = objs[2 * k], objs[2 * k + 1]
            allowed = [o for o in counts if o not in present[image] and o not in objs[:2 * k + 1]]
            assert neg in allowed
            if split == "popular":  # the most frequent object among the sampled images
                assert counts[neg] == max(counts[o] for o in allowed)
            if split == "adversarial":  # the object co-occurring most with the positive
                cand = [o for o in co[pos] if o in allowed]
                if cand:
                    row = {o: sum(o in im and pos in im for im in images) for o in cand}
                    assert row[neg] == max(row.values())


def test_builder_counts_and_co_occurrence_hand_computed():
    images = [{"objects": ["person", "dog", "car"]}, {"objects": ["dog", "cat", "person"]},
              {"objects": ["cat", "bus", "cup"]}]
    assert pope.object_counts(images) == {"person": 2, "dog": 2, "car": 1, "cat": 2, "bus": 1, "cup": 1}
    co = pope.co_occurrence(images)
    assert co["person"] == ["dog", "car", "cat"]  # dog twice, then ties in first-seen order
    assert co["cat"] == ["dog", "person", "bus", "cup"]


def test_builder_popular_hand_computed():
    # All four images are sampled (in some order); counts: person 3, dog 2, every other
    # object 1. Only negatives decided by person / dog are order-free, so only those are checked.
    images = {1: ["person", "dog", "car"], 2: ["person", "dog", "bus"], 3: ["person", "cup", "tv"],
              4: ["apple", "oven", "bench"]}
    qs = pope.build_questions(coco_instances(images), "popular", num_images=4, per_image=3, seed=0)
    by_image = {}
    for q in qs:
        by_image.setdefault(q["image"], []).append((q["text"], q["label"]))
    # Image 4 holds none of person (3 images) and dog (2): they are its first two negatives.
    img4 = by_image["COCO_val2014_000000000004.jpg"]
    assert img4[0] == ("Is there an apple in the image?", "yes")
    assert img4[1] == ("Is there a person in the image?", "no")
    assert img4[3] == ("Is there a dog in the image?", "no")
    assert img4[4] == ("Is there a bench in the image?", "yes")
    # Image 3 lacks dog (2): its first negative.
    assert by_image["COCO_val2014_000000000003.jpg"][1] == ("Is there a dog in the image?", "no")


def test_builder_is_seeded_and_writes_the_official_format(tmp_path):
    instances = coco_instances(IMAGES)
    a = pope.build_all_splits(instances, num_images=6, seed=11)
    b = pope.build_all_splits(instances, num_images=6, seed=11)
    assert a == b
    assert pope.build_questions(instances, "popular", num_images=6, seed=11) == a["popular"]
    p1 = pope.write_questions(a["random"], tmp_path / "x" / "coco_pope_random.json")
    p2 = pope.write_questions(b["random"], tmp_path / "y.json")
    assert p1.read_bytes() == p2.read_bytes()
    first = json.loads(p1.read_text().splitlines()[0])
    assert list(first) == ["question_id", "image", "text", "label"]
    assert pope.load_questions(p1).records == a["random"]
    others = [pope.build_all_splits(instances, num_images=6, seed=s)["random"] for s in range(5)]
    assert any(o != a["random"] for o in others)
    # A path works like the dict.
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(instances))
    assert pope.build_questions(str(path), "random", num_images=6, seed=11) == a["random"]


def test_question_text_articles():
    assert pope.question_text("apple") == "Is there an apple in the image?"
    assert pope.question_text("umbrella") == "Is there an umbrella in the image?"
    assert pope.question_text("oven") == "Is there an oven in the image?"
    assert pope.question_text("person") == "Is there a person in the image?"
    assert pope.question_text("dog", "Is a {} here?") == "Is a dog here?"


def test_builder_bad_arguments():
    instances = coco_instances(IMAGES)
    with pytest.raises(InputError, match="only 8 images have at least 3 objects"):
        pope.build_questions(instances, "random", num_images=9)
    with pytest.raises(InputError, match="did you mean 'popular'"):
        pope.build_questions(instances, "populr", num_images=2)
    with pytest.raises(InputError, match="per_image"):
        pope.build_questions(instances, "random", num_images=2, per_image=0)
    with pytest.raises(InputError, match="lacks"):
        pope.build_questions({"images": []}, "random", num_images=1)
    with pytest.raises(InputError, match="no negative object left"):
        pope.build_questions(coco_instances({1: ["person", "dog", "car"]}), "random", num_images=1)
