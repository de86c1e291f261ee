"""CHAIR: every word rule, the quirks, the metrics and the COCO ground truth on crafted data."""

from __future__ import annotations

import json

import pytest

from veridical.errors import InputError
from veridical.evals import chair


def cats(caption: str, singularizer: str = "pattern", **vocab_kw) -> list[str]:
    vocab = chair.load_vocabulary(**vocab_kw)
    return chair.caption_words(caption, vocab, singularizer).categories


# --------------------------------------------------------------------------- synonym table


def test_synonym_table_is_the_reference_data():
    vocab = chair.load_vocabulary()
    assert len(vocab.categories) == 80
    assert vocab.categories[0] == "person" and vocab.categories[-1] == "toothbrush"
    lines = [ln for ln in chair.SYNONYMS_FILE.read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 80
    assert "motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped" in lines
    assert "cake,  cheesecake, cupcake, shortcake, coffeecake, pancake" in lines
    # Reference parsing: the double space leaves a leading space in the entry.
    assert vocab.to_category[" motor bike"] == "motorcycle" and "motor bike" not in vocab.to_category
    assert vocab.to_category[" cheesecake"] == "cake" and "cheesecake" not in vocab.to_category
    assert vocab.to_category["iPhone"] == "cell phone"
    assert len(chair.DOUBLE_WORDS) == 29 and "train track" in chair.DOUBLE_WORDS
    fixed = chair.load_vocabulary(double_space_quirk=False)
    assert fixed.to_category["motor bike"] == "motorcycle" and fixed.to_category["cheesecake"] == "cake"
    assert set(fixed.to_category) - set(vocab.to_category) == {"motor bike", "cheesecake"}


def test_parse_synonym_lines_skips_comments():
    rows = chair.parse_synonym_lines(["# header", "", "cake,  cheesecake, cupcake", "bison "])
    assert rows == [["cake", " cheesecake", "cupcake"], ["bison"]]
    rows = chair.parse_synonym_lines(["cake,  cheesecake, cupcake"], double_space_quirk=False)
    assert rows == [["cake", "cheesecake", "cupcake"]]


# --------------------------------------------------------------------------- word rules


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        # plurals and irregular plurals
        ("Two dogs chase three cats.", ["dog", "cat"]),
        ("People and children near the buses.", ["person", "person", "bus"]),
        ("Mice, knives and geese.", ["mouse", "knife", "bird"]),
        # two-word phrases win over their parts
        ("A hot dog next to a teddy bear and a cell phone.", ["hot dog", "teddy bear", "cell phone"]),
        ("Two traffic lights and fire hydrants.", ["traffic light", "fire hydrant"]),
        ("Wine glasses and a wine glass.", ["wine glass", "wine glass"]),
        # 'baby|adult <animal>' is the animal, not a person
        ("A baby elephant walks by an adult elephant.", ["elephant", "elephant"]),
        ("A baby near a dog.", ["person", "dog"]),
        # 'passenger jet|train' is the vehicle, not a person
        ("A passenger train and a passenger jet.", ["train", "airplane"]),
        ("A passenger waits.", ["person"]),
        # 'bow tie' is a tie; 'train track' is not a train; 'home plate' is nothing
        ("A man in a bow tie.", ["person", "tie"]),
        ("Train tracks along the road.", []),
        ("A player at home plate.", ["person"]),
        # toilet rules: 'toilet seat' -> toilet; any 'seat' is dropped when a toilet is mentioned
        ("A toilet seat.", ["toilet"]),
        ("The seat next to the toilet.", ["toilet"]),
        ("A seat by the window.", ["chair"]),
        # the three-word entry never matches: two ovens
        ("A stove top oven.", ["oven", "oven"]),
        # synonyms map to their category; capitalised 'iPhone' never matches
        ("A puppy on a sofa with an iPhone.", ["dog", "couch"]),
        # possessives and punctuation are split off by the tokenizer
        ("The dog's bowl.", ["dog", "bowl"]),
    ],
)
def test_word_rules(caption, expected):
    assert cats(caption) == expected


def test_double_space_quirk_and_its_switch():
    assert cats("A motor bike and a cheesecake.") == []
    assert cats("A motor bike and a cheesecake.", double_space_quirk=False) == ["motorcycle", "cake"]
    # Entries after the double space on those lines are unaffected.
    assert cats("A motorbike and a cupcake.") == ["motorcycle", "cake"]


def test_singularizer_variants():
    # pattern (original): singular 'bus' loses its 's'; 'ties', 'canoes' are missed.
    assert cats("A bus, two buses, ties and canoes.") == ["bus"]
    assert cats("Thieves and grandchildren.") == ["person"]
    # wordnet-noun (OPERA on nouns): all counted.
    assert cats("A bus, two buses, ties and canoes.", "wordnet-noun") == ["bus", "bus", "tie", "boat"]
    assert cats("Thieves and grandchildren.", "wordnet-noun") == ["person", "person"]
    # plain inflect: like pattern on 'bus', like WordNet on 'ties' / 'canoes'.
    assert cats("A bus, two buses, ties and canoes.", "inflect") == ["bus", "tie", "boat"]
    with pytest.raises(InputError, match="did you mean 'pattern'"):
        chair.get_singularizer("patern")
    assert chair.available_singularizers() == ["pattern", "wordnet-noun", "inflect"]


def test_tokenizer_and_length():
    text = "a man isn't holding skis. the dogs' bowls (two) are here."
    assert chair.tokenize(text) == ["a", "man", "is", "n't", "holding", "skis", ".", "the", "dogs",
                                    "'", "bowls", "(", "two", ")", "are", "here", "."]
    cw = chair.caption_words(text.upper())  # lowercased first
    assert len(cw.words) == 17 and cw.words[5] == "ski" and cw.words[8] == "dog"
    assert cw.mentions == (("man", "person"), ("ski", "skis"), ("dog", "dog"), ("bowl", "bowl"))
    # merged phrases count as one word
    assert len(chair.caption_words("a hot dog").words) == 2


def test_drop_incomplete_sentence():
    assert chair.drop_incomplete_sentence("A dog. A cat sits on a") == "A dog."
    assert chair.drop_incomplete_sentence("A dog. A cat.") == "A dog. A cat."
    assert chair.drop_incomplete_sentence("no period at all") == ""


# --------------------------------------------------------------------------- metrics


GT = {1: {"person", "dog", "frisbee"}, 2: {"car", "bus"}, 3: {"cat"}}
CAPTIONS = [
    # 13 words; mentions person, frisbee, dog, cat; cat hallucinated; covers 3 of 3
    {"image_id": 1, "caption": "A man throws a frisbee to two dogs. A cat watches."},
    # 9 words; mentions bus, car; nothing hallucinated; covers 2 of 2
    {"image_id": 2, "caption": "Two buses and a car on the street."},
    # 10 words; mentions dog, dog, couch, all hallucinated; covers 0 of 1
    {"image_id": 3, "caption": "A dog and a dog sleeping on a couch."},
]


def test_metrics_hand_computed():
    result = chair.score(CAPTIONS, GT)
    m = result["metrics"]
    assert m["chair_s"] == 2 / 3
    assert m["chair_i"] == 4 / 9
    assert m["recall"] == 5 / 6
    assert m["length"] == 32 / 3
    assert (m["captions"], m["mentions"], m["hallucinated"]) == (3, 9, 4)
    first, _, third = result["captions"]
    assert first["hallucinated"] == [["cat", "cat"]]
    assert first["covered"] == ["dog", "frisbee", "person"]
    assert first["mentions"] == [["man", "person"], ["frisbee", "frisbee"], ["dog", "dog"], ["cat", "cat"]]
    assert (first["chair_s"], first["chair_i"], first["recall"], first["words"]) == (1, 0.25, 1.0, 13)
    assert third["hallucinated"] == [["dog", "dog"], ["dog", "dog"], ["couch", "couch"]]
    assert third["chair_i"] == 1.0 and third["recall"] == 0.0
    assert result["settings"]["singularizer"] == "pattern"
    assert result["settings"]["double_space_quirk"] is True


def test_drop_incomplete_changes_the_score():
    caps = [{"image_id": 1, "caption": "A man throws a frisbee to two dogs. A cat watches"}]
    assert chair.score(caps, GT)["metrics"]["chair_s"] == 1.0
    dropped = chair.score(caps, GT, drop_incomplete=True)
    assert dropped["metrics"]["chair_s"] == 0.0
    assert dropped["captions"][0]["caption"] == "A man throws a frisbee to two dogs."


def test_empty_inputs_give_zero_not_an_error():
    m = chair.score([{"image_id": 3, "caption": "Nothing here."}], GT)["metrics"]
    assert (m["chair_s"], m["chair_i"], m["recall"], m["length"]) == (0.0, 0.0, 0.0, 3.0)
    assert chair.aggregate([])["chair_s"] == 0.0


# --------------------------------------------------------------------------- ground truth


def coco_dir(tmp_path, split="val2014"):
    """instances_{split}.json + captions_{split}.json for images 1, 2, 3 (4 has no annotation)."""
    cats_ = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"},
             {"id": 17, "name": "cat"}, {"id": 6, "name": "bus"}]
    images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in (1, 2, 3, 4)]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 18},
        {"id": 12, "image_id": 1, "category_id": 1}, {"id": 13, "image_id": 2, "category_id": 3},
        {"id": 14, "image_id": 3, "category_id": 17},
    ]
    caps = [
        {"id": 1, "image_id": 1, "caption": "A man plays frisbee with his dog."},
        {"id": 2, "image_id": 1, "caption": "A woman and a puppy."},
        {"id": 3, "image_id": 2, "caption": "Two buses behind a car."},
        {"id": 4, "image_id": 3, "caption": "A kitten sleeps."},
        {"id": 5, "image_id": 4, "caption": "An empty street with a bench."},
    ]
    d = tmp_path / "annotations"
    d.mkdir(exist_ok=True)
    (d / f"instances_{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                           "categories": cats_}))
    (d / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return d


def test_ground_truth_is_instances_union_caption_objects(tmp_path):
    d = coco_dir(tmp_path)
    gt, used = chair.load_ground_truth(d, [1, 2, 3, 4, 99])
    assert gt == {1: {"person", "dog", "frisbee"}, 2: {"car", "bus"}, 3: {"cat"}, 4: {"bench"}}
    assert [p.rsplit("/", 1)[-1] for p in used] == ["instances_val2014.json", "captions_val2014.json"]
    # dicts work as well as files
    inst = json.loads((d / "instances_val2014.json").read_text())
    caps = json.loads((d / "captions_val2014.json").read_text())
    assert chair.ground_truth_from_coco(inst, caps, [2]) == {2: {"car", "bus"}}


def test_score_files_end_to_end(tmp_path):
    d = coco_dir(tmp_path)
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CAPTIONS))
    result = chair.score_files(path, d)
    assert result["metrics"]["chair_s"] == 2 / 3
    assert result["metrics"]["chair_i"] == 4 / 9
    assert result["metrics"]["recall"] == 5 / 6
    # an explicit id list restricts the images and needs a caption for each
    only = chair.score_files(path, d, image_ids=[2, 3])
    assert only["metrics"]["captions"] == 2 and only["metrics"]["chair_s"] == 0.5
    with pytest.raises(InputError, match="no caption for 1 of the requested images"):
        chair.score_files(path, d, image_ids=[2, 4])


def test_bad_caption_files(tmp_path):
    d = coco_dir(tmp_path)
    path = tmp_path / "captions.jsonl"
    rows = [json.dumps(c) for c in CAPTIONS] + [json.dumps({"image_id": 777, "caption": "A dog."})]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"captions.jsonl, line 4: image_id 777 is in none of"):
        chair.score_files(path, d)
    skipped = chair.score_files(path, d, skip_bad_lines=True)
    assert skipped["missing_images"] == 1 and skipped["metrics"]["captions"] == 3
    path.write_text("\n".join(rows[:3] + ['{"image_id": "abc", "caption": "x"}', "oops"]) + "\n")
    with pytest.raises(InputError, match=r"line 4: 'image_id' must be a COCO image id"):
        chair.score_files(path, d)
    skipped = chair.score_files(path, d, skip_bad_lines=True)
    assert skipped["skipped_lines"] == 2 and skipped["metrics"]["chair_s"] == 2 / 3
    path.write_text("\n".join(rows[:2] + rows[:1]) + "\n")
    with pytest.raises(InputError, match=r"line 3: image_id 1 already has a caption at line 1"):
        chair.load_captions(path)
    # a JSON array and string ids are fine
    path.write_text(json.dumps([{"image_id": "2", "caption": "A car."}]))
    assert chair.load_captions(path).records[0]["image_id"] == 2


def test_annotation_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        chair.annotation_files(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="has none of"):
        chair.annotation_files(empty)
    d = coco_dir(tmp_path)
    (d / "captions_val2014.json").unlink()
    with pytest.raises(InputError, match="found instances_val2014.json but not captions_val2014.json"):
        chair.annotation_files(d)


def test_unknown_category_in_instances(tmp_path):
    inst = {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
            "categories": [{"id": 1, "name": "spaceship"}]}
    with pytest.raises(InputError, match="'spaceship', which is not in the CHAIR synonym table"):
        chair.ground_truth_from_coco(inst, {"images": [], "annotations": []}, [1])


def test_image_selection(tmp_path):
    pool = list(range(100, 200))
    a = chair.select_image_ids(pool, num_images=10, seed=1)
    assert a == chair.select_image_ids(reversed(pool), num_images=10, seed=1)
    assert len(set(a)) == 10 and set(a) <= set(pool)
    assert a != chair.select_image_ids(pool, num_images=10, seed=2)
    assert chair.select_image_ids(pool, ids=[150, 101]) == [150, 101]
    with pytest.raises(InputError, match="not in the annotations"):
        chair.select_image_ids(pool, ids=[5])
    with pytest.raises(InputError, match="num_images must be between 1 and 100"):
        chair.select_image_ids(pool, num_images=101)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("150\n101\n\n")
    assert chair.read_image_ids(ids_file) == [150, 101]
    ids_file.write_text("[150, 101]")
    assert chair.read_image_ids(ids_file) == [150, 101]
    ids_file.write_text("150\nx1\n")
    with pytest.raises(InputError, match=r"ids.txt, line 2"):
        chair.read_image_ids(ids_file)
