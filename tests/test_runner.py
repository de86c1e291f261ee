"""The eval runner: outputs, resume after a crash, refusal of mixed runs, shards, compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from veridical.cli import main
from veridical.errors import InputError
from veridical.evals import pope
from veridical.world.generate import WorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    generate_world(folder, WorldConfig(pope_images=6, mme_images_per_task=3), 0, {"test": 40})
    return folder


def run_eval(*argv: str) -> int:
    return main(["eval", *argv])


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


POPE = ["pope", "--model", "tiny-random:llava", "--max-new-tokens", "3", "--batch-size", "5"]


def test_pope_run_writes_samples_and_reference_scores(world, tmp_path):
    out = tmp_path / "pope"
    assert run_eval(*POPE, "--data", str(world), "--output", str(out)) == 0
    got = samples(out)
    assert len(got) == 3 * 36 and len({s["id"] for s in got}) == len(got)
    res = results(out)
    assert set(res["metrics"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "per_split"}
    run = res["run"]
    assert run["method"] == "none" and run["batch_size"] == 5 and run["decoding"]["max_new_tokens"] == 3
    assert run["data"]["prompt_suffix"] == " Please answer this question with one word."
    assert all(f["sha256"] for f in run["data"]["files"]) and run["versions"]["torch"]
    # the runner's numbers (every metric, every split, and pooled) equal the reference scorer
    # run on the same answers
    questions, answers = [], []
    for split in pope.SPLITS:
        questions.append(world / "pope" / "test" / f"coco_pope_{split}.json")
        answers.append(tmp_path / f"{split}.jsonl")
        answers[-1].write_text("".join(
            json.dumps({"question_id": s["meta"]["question_id"], "text": s["output"]}) + "\n"
            for s in got if s["meta"]["split"] == split))
    ref = pope.score_files(questions, answers)
    assert res["metrics"]["per_split"] == ref["splits"] and list(ref["splits"]) == list(pope.SPLITS)
    assert {k: v for k, v in res["metrics"].items() if k != "per_split"} == ref["overall"]


# a random branch and sampling: every item's output depends on its own seed
SAMPLED = ["--method", "ritual", "--do-sample", "--seed", "4"]


def test_crash_then_rerun_resumes_to_the_same_results(world, tmp_path, monkeypatch):
    full = tmp_path / "full"
    args = [*POPE, "--data", str(world), "--split", "adversarial", *SAMPLED]
    assert run_eval(*args, "--output", str(full)) == 0

    from veridical.decoding.engine import Engine

    real, calls = Engine.generate, {"n": 0}

    def crash_on_third_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the process were killed mid-run
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "generate", crash_on_third_batch)
    part = tmp_path / "part"
    assert run_eval(*args, "--output", str(part)) == 130
    assert len(samples(part)) == 10 and not (part / "results.json").exists()
    with open(part / "samples.jsonl", "a") as f:  # a line cut by the kill
        f.write('{"id": "adversarial/99", "prom')
    monkeypatch.setattr(Engine, "generate", real)
    assert run_eval(*args, "--output", str(part)) == 0
    assert samples(part) == samples(full)  # outputs and seeds too, item by item
    assert results(part)["metrics"] == results(full)["metrics"]


def test_rerun_with_other_settings_is_refused(world, tmp_path, capsys):
    out = tmp_path / "x"
    assert run_eval(*POPE, "--data", str(world), "--limit", "5", "--output", str(out)) == 0
    assert run_eval(*POPE, "--data", str(world), "--limit", "5", "--method", "none",
                    "--temperature", "0.5", "--output", str(out)) == 2
    assert "holds a run with other settings (decoding)" in capsys.readouterr().err


def test_chair_and_mme_runs(world, tmp_path):
    chair = tmp_path / "chair"
    assert run_eval("chair", "--model", "tiny-random:llava", "--data", str(world), "--num-images",
                    "6", "--max-new-tokens", "8", "--output", str(chair)) == 0
    m = results(chair)["metrics"]
    assert set(m) >= {"chair_s", "chair_i", "recall", "length"}
    assert len(results(chair)["run"]["data"]["image_ids"]) == 6
    mme = tmp_path / "mme"
    assert run_eval("mme", "--model", "tiny-random:llava", "--data", str(world),
                    "--max-new-tokens", "2", "--output", str(mme)) == 0
    m = results(mme)["metrics"]
    assert set(m) >= {"existence", "count", "position", "color", "hallucination"}
    assert m["hallucination"] == sum(m[k] for k in ("existence", "count", "position", "color"))


def test_compare_writes_table_and_chart(world, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_eval(*POPE, "--data", str(world), "--limit", "4", "--output", str(out)) == 0
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert run_eval("compare", str(a), str(b), "--png", str(png)) == 0
    table = capsys.readouterr().out
    assert "| a | pope | none |" in table and "| b | pope | none |" in table
    assert png.stat().st_size > 1000 and f"chart: {png}" in table
    assert "Δ +0.000 [+0.000, +0.000]" in table  # same model and data: paired difference 0


def test_compare_splits_runs_by_benchmark(world, tmp_path, capsys, monkeypatch):
    pope_run, chair_run = tmp_path / "p", tmp_path / "c"
    assert run_eval(*POPE, "--data", str(world), "--limit", "4", "--output", str(pope_run)) == 0
    assert run_eval("chair", "--model", "tiny-random:llava", "--data", str(world),
                    "--num-images", "4", "--max-new-tokens", "4", "--output",
                    str(chair_run)) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the default --png is compare.png here
    assert run_eval("compare", str(pope_run), str(chair_run), str(pope_run)) == 0
    out = capsys.readouterr().out
    pope_part, chair_part = out.split("## CHAIR")
    assert pope_part.startswith("## POPE") and "chair_s" not in pope_part
    assert "| p | pope | none |" in pope_part and "| c |" not in pope_part
    assert "| run | benchmark | method | chair_s | chair_i | recall | length |" in chair_part
    assert "adversarial f1" in pope_part and "chair_i" in chair_part  # the intervals
    for kind in ("pope", "chair"):
        chart = tmp_path / f"compare-{kind}.png"
        assert chart.stat().st_size > 1000 and f"chart: {chart}" in out
    assert not (tmp_path / "compare.png").exists()
    # runs of one benchmark on other images: the intervals cannot pair them
    other = tmp_path / "p12"  # 6 questions per image: 2 images, where p has 1
    assert run_eval(*POPE, "--data", str(world), "--limit", "12", "--output", str(other)) == 0
    with pytest.raises(InputError, match="cover different images.*--bootstrap 0"):
        run_eval_raise("compare", str(pope_run), str(other), "--png", "")
    assert run_eval("compare", str(pope_run), str(other), "--bootstrap", "0", "--png", "") == 0


def test_compare_help_says_where_the_chart_goes(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "compare", "--help"])
    assert "default: compare.png in the current folder" in " ".join(
        capsys.readouterr().out.split())


def test_bad_data_errors(world, tmp_path, capsys):
    bad = tmp_path / "q.json"
    bad.write_text('{"question_id": 1, "image": "x.png", "text": "Is there a cup?", "label": "yes"}\n'
                   "{not json\n")
    assert run_eval(*POPE, "--data", str(bad), "--images", str(tmp_path), "--output",
                    str(tmp_path / "o1")) == 2
    assert "q.json" in (err := capsys.readouterr().err) and "line 2" in err
    good = tmp_path / "coco_pope_random.json"
    good.write_text('{"question_id": 1, "image": "missing.png", "text": "Is there a cup?", '
                    '"label": "yes"}\n')
    assert run_eval(*POPE, "--data", str(good), "--images", str(tmp_path), "--output",
                    str(tmp_path / "o2")) == 2
    assert "1 items name image files that do not exist (first: " in capsys.readouterr().err
    # with the flag the item is skipped and counted
    (tmp_path / "there.png").write_bytes((world / "images" / "test" / sorted(
        p.name for p in (world / "images" / "test").iterdir())[0]).read_bytes())
    with open(good, "a") as f:
        f.write('{"question_id": 2, "image": "there.png", "text": "Is there a cup?", '
                '"label": "no"}\n')
    assert run_eval(*POPE, "--data", str(good), "--images", str(tmp_path), "--output",
                    str(tmp_path / "o3"), "--skip-bad-lines") == 0
    res = results(tmp_path / "o3")
    assert res["run"]["skipped_items"]["missing_images"] == 1 and res["run"]["items"] == 1
    with pytest.raises(InputError, match="not a POPE split"):
        run_eval_raise(*POPE, "--data", str(world), "--split", "hard", "--output", str(tmp_path))


def run_eval_raise(*argv):
    from veridical.cli import build_parser

    args = build_parser().parse_args(["eval", *argv])
    return args.func(args)


def test_two_processes_merge_to_the_single_process_result(world, tmp_path):
    single = tmp_path / "single"
    args = [*POPE, "--data", str(world), "--split", "random", "--limit", "12", *SAMPLED]
    assert run_eval(*args, "--output", str(single)) == 0
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "veridical", "eval", *args, "--output", str(multi)],
        check=True, env=env, cwd=ROOT, capture_output=True, timeout=300,
    )
    assert samples(multi) == samples(single)
    assert results(multi)["metrics"] == results(single)["metrics"]
    assert results(multi)["run"]["processes"] == 2
    assert not list(multi.glob("samples.rank*"))


def test_limit_is_per_split_or_subtask_and_zero_is_refused(world, tmp_path, capsys):
    out = tmp_path / "pope"
    assert run_eval(*POPE, "--data", str(world), "--limit", "3", "--output", str(out)) == 0
    splits = [s["meta"]["split"] for s in samples(out)]
    assert sorted(splits) == sorted(["random"] * 3 + ["popular"] * 3 + ["adversarial"] * 3)
    assert set(results(out)["metrics"]["per_split"]) == {"random", "popular", "adversarial"}
    mme_out = tmp_path / "mme"
    assert run_eval("mme", "--model", "tiny-random:llava", "--data", str(world), "--limit", "1",
                    "--max-new-tokens", "2", "--output", str(mme_out)) == 0
    by_task: dict[str, list] = {}
    for s in samples(mme_out):
        by_task.setdefault(s["meta"]["subtask"], []).append(s["meta"]["image"])
    assert len(by_task) > 1  # every subtask scored, not only the first
    assert all(len(images) == 2 and len(set(images)) == 1 for images in by_task.values())
    assert run_eval(*POPE, "--data", str(world), "--limit", "0", "--output",
                    str(tmp_path / "zero")) == 2
    assert "--limit 0 must be a positive integer" in capsys.readouterr().err


def test_progress_bars_name_the_split_and_the_beams():
    from types import SimpleNamespace

    from veridical.evals.runner import progress_label

    pope_one = SimpleNamespace(name="pope", data={"splits": ["adversarial"]})
    assert progress_label(pope_one, {"method": "vcd"}) == "pope adversarial vcd"
    chair = SimpleNamespace(name="chair", data={})
    assert progress_label(chair, {"method": "none", "num_beams": 5}) == "chair none beams=5"
    pope_all = SimpleNamespace(name="pope", data={"splits": ["random", "popular", "adversarial"]})
    assert progress_label(pope_all, {"method": "none"}) == "pope none"


def test_eval_chair_takes_the_singularizer(world, tmp_path, capsys):
    base = ["chair", "--model", "tiny-random:llava", "--data", str(world), "--num-images", "3",
            "--max-new-tokens", "6"]
    out = tmp_path / "wn"
    assert run_eval(*base, "--singularizer", "wordnet-noun", "--output", str(out)) == 0
    res = results(out)
    assert res["metrics"]["settings"]["singularizer"] == "wordnet-noun"
    assert res["run"]["data"]["singularizer"] == "wordnet-noun"
    assert run_eval(*base, "--singularizer", "plural", "--output", str(tmp_path / "x")) == 2
    assert "unknown CHAIR singularizer 'plural'" in capsys.readouterr().err


def test_an_ambiguous_parameter_names_every_qualified_form():
    from veridical.decoding.registry import resolve

    with pytest.raises(ValueError, match=r"qualify it: vhr\.alpha or vcd\.alpha"):
        resolve("vhr+vcd", {"alpha": -2})


def test_an_eval_run_past_the_model_s_context_is_refused_before_any_item(world, tmp_path):
    import veridical

    out = tmp_path / "long"
    with pytest.raises(InputError, match="context is 512 tokens.*lower max_new_tokens"):
        veridical.evaluate(veridical.load("tiny-random:llava"), veridical.EvalConfig(
            "pope", model="tiny-random:llava", data=str(world), output=str(out), limit=2,
            max_new_tokens=600))
    assert not (out / "samples.jsonl").exists() or not samples(out)
