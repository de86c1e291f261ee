"""Randomness belongs to the request: seeds per request and per evaluation item, fresh seeds
returned for replay, and the one stop-string rule (decoding/seeds.py, decoding/stops.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_engine

from veridical.cli import main
from veridical.decoding.branches import ritual_transform
from veridical.decoding.engine import DecodingConfig
from veridical.decoding.registry import resolve
from veridical.decoding.seeds import SEED_BITS, derive_seed, request_seeds
from veridical.decoding.stops import cut_at_stop, stop_index
from veridical.errors import InputError
from veridical.server.streaming import TextStream
from veridical.world import WorldConfig, generate_world


# Seeds ------------------------------------------------------------------------------------------
def test_derived_seeds_differ_per_key_and_do_not_depend_on_the_interpreter():
    ids = [f"random/{i}" for i in range(200)]
    seeds = [derive_seed(0, "item", i) for i in ids]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**SEED_BITS for s in seeds)
    assert derive_seed(1, "item", ids[0]) != seeds[0]  # another run seed, other draws
    assert derive_seed(0, "item", ids[0]) == seeds[0]
    # Python's own hash() is salted per process; the derived seed must not be
    code = "from veridical.decoding.seeds import derive_seed; print(derive_seed(0, 'item', 'x'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": h}, check=True).stdout
            for h in ("1", "2")}
    assert outs == {f"{derive_seed(0, 'item', 'x')}\n"}


def test_request_seeds_fresh_given_or_per_request():
    fresh = request_seeds(None, 4)
    assert len(set(fresh)) == 4 and all(isinstance(s, int) for s in fresh)
    assert request_seeds(5, 3) == [5, 5, 5]  # an explicit seed applies to each request as given
    mixed = request_seeds([1, None, 3], 3)
    assert mixed[0] == 1 and mixed[2] == 3 and isinstance(mixed[1], int)
    for bad in ([1, 2], [1, "2", 3], 1.5, True):
        with pytest.raises(InputError, match="seed"):
            request_seeds(bad, 3)


def test_two_items_of_a_run_get_different_ritual_transforms_and_vcd_noise(images):
    engine = tiny_engine("llava")
    image = images[0]
    request = engine.request(image, "what is in the image ?")
    seeds = [derive_seed(0, "item", f"random/{i}") for i in range(12)]
    vcd, = resolve("vcd").branches()
    rows = engine.branch_rows([request] * 12, [vcd], seeds)
    noise = [r["pixel_values"] for r in rows]
    assert not torch.equal(noise[0], noise[1])  # same image shape, different noise
    assert all(not torch.equal(noise[0], n) for n in noise[1:])
    ritual, = resolve("ritual").branches()
    transformed = [r["pixel_values"] for r in engine.branch_rows([request] * 12, [ritual], seeds)]
    assert len({t.numpy().tobytes() for t in transformed}) >= 6
    names = [ritual_transform(image, torch.Generator().manual_seed(
        derive_seed(s, "branch", ritual.name)))[1] for s in seeds]
    assert len(set(names)) >= 3  # the old seed-0-for-everyone drew one transform for all
    # the same seed rebuilds the same branch
    again = engine.branch_rows([request], [vcd], seeds[:1])[0]["pixel_values"]
    assert torch.equal(again, noise[0])


def test_branches_draw_from_their_own_streams_alone_or_composed(images):
    engine = tiny_engine("llava")
    request = engine.request(images[0], "what is in the image ?")
    composed = engine.branch_rows([request], resolve("ritual+vcd").branches(), [7])
    ritual = engine.branch_rows([request], resolve("ritual").branches(), [7])
    vcd = engine.branch_rows([request], resolve("vcd").branches(), [7])
    # each branch draws what it draws alone: its stream is keyed by its own name ...
    assert torch.equal(composed[0]["pixel_values"], ritual[0]["pixel_values"])
    assert torch.equal(composed[1]["pixel_values"], vcd[0]["pixel_values"])
    # ... and the two streams of one request differ
    assert derive_seed(7, "branch", "transformed") != derive_seed(7, "branch", "noised")


@pytest.mark.parametrize("method", ["ritual", "vcd"])
def test_seed_none_is_fresh_per_request_and_returned_for_replay(method, images, prompts):
    engine = tiny_engine("llava")
    kw = dict(method=method, max_new_tokens=6, do_sample=True)
    first = engine.generate(images, prompts, **kw)
    seeds = [r.seed for r in first]
    assert len(set(seeds)) == 4  # not one seed (0) copied to every request
    replay = engine.generate(images, prompts, seed=seeds, **kw)
    assert [r.token_ids for r in replay] == [r.token_ids for r in first]
    one = engine.generate(images[2], prompts[2], seed=seeds[2], **kw)
    assert one.token_ids == first[2].token_ids and one.seed == seeds[2]


def test_an_explicit_seed_is_its_requests_whatever_the_batch(images, prompts):
    engine = tiny_engine("llava")
    kw = dict(method="ritual", max_new_tokens=6, do_sample=True)
    batch = engine.generate(images, prompts, seed=11, **kw)
    assert [r.seed for r in batch] == [11] * 4
    for image, prompt, result in zip(images, prompts, batch):
        assert engine.generate(image, prompt, seed=11, **kw).token_ids == result.token_ids


def test_engine_run_resolves_missing_seeds_and_reports_them(images, prompts):
    engine = tiny_engine("llava")
    requests = [engine.request(i, p) for i, p in zip(images[:2], prompts[:2])]
    out = engine.run(requests, resolve("vcd"), DecodingConfig(max_new_tokens=3), [None, 9])
    assert isinstance(out[0].seed, int) and out[1].seed == 9


# Evaluation runs: item seeds from the run seed and the item's id ---------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    generate_world(folder, WorldConfig(pope_images=6, mme_images_per_task=3), 0, {"test": 40})
    return folder


def eval_samples(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


SAMPLED = ["pope", "--model", "tiny-random:llava", "--max-new-tokens", "3", "--method", "ritual",
           "--do-sample", "--split", "random", "--limit", "8"]


def test_an_items_output_is_the_same_at_batch_size_1_and_8(world, tmp_path):
    outs = {}
    for size in ("1", "8"):
        outs[size] = tmp_path / f"b{size}"
        assert main(["eval", *SAMPLED, "--data", str(world), "--batch-size", size,
                     "--output", str(outs[size])]) == 0
    one, eight = eval_samples(outs["1"]), eval_samples(outs["8"])
    assert one == eight
    assert [s["seed"] for s in one] == [derive_seed(0, "item", s["id"]) for s in one]
    assert len({s["seed"] for s in one}) == len(one)
    run = json.loads((outs["8"] / "results.json").read_text())["run"]
    assert run["decoding"]["seed"] == 0
    other = tmp_path / "seed3"
    assert main(["eval", *SAMPLED, "--data", str(world), "--seed", "3", "--output",
                 str(other)]) == 0
    assert [s["seed"] for s in eval_samples(other)] == [derive_seed(3, "item", s["id"])
                                                       for s in one]


# Stop strings -------------------------------------------------------------------------------------
def test_text_stops_at_the_earliest_stop_string():
    text = "a cat . then a dog ! and more"
    assert stop_index(text, ["!", "."]) == text.index(".")
    assert cut_at_stop(text, ["!", "."]) == ("a cat ", True)  # not at "!" (found last)
    assert cut_at_stop(text, ["and", "dog"]) == ("a cat . then a ", True)
    assert cut_at_stop(text, ["zebra"]) == (text, False)
    assert cut_at_stop(text, []) == (text, False)


def test_engine_cuts_at_the_earliest_stop_string(images, prompts):
    engine = tiny_engine("llava")
    full = engine.generate(images[0], prompts[0], max_new_tokens=12, ignore_eos=True).text
    early = full[2:5]
    # a stop string listed first that first occurs later in the text
    late = next(full[i:i + 3] for i in range(len(full) - 3, 5, -1)
                if full.find(full[i:i + 3]) > full.find(early))
    out = engine.generate(images[0], prompts[0], max_new_tokens=12, ignore_eos=True,
                          stop=[late, early])
    assert out.text == full[: full.find(early)].strip() and out.finish_reason == "stop"


def test_text_stream_never_sends_the_start_of_a_stop_string():
    # the stop string arrives split over tokens; just before its last character, the text
    # ends with all but one of its characters ("on the ma")
    pieces = ["the", " cat", " sat", " on", " the", " ma", "t", " here"]

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    stream = TextStream(decode, stops=["on the mat"])
    sent = ""
    for n in range(len(pieces)):
        sent += stream.feed(list(range(n + 1)))
        assert "the cat sat".startswith(sent), (n, sent)  # nothing past the answer, ever
    assert sent == "the cat sat" and stream.finish("the cat sat") == ""


# The server: a fresh seed per request, answered back for replay ---------------------------------
def test_server_answers_the_seed_it_used_and_a_replay_gives_the_same_answer(images):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import base64
    import io

    from veridical.server import ServerSettings, create_app
    from veridical.server.background import serve_in_thread

    engine = tiny_engine("llava")
    buf = io.BytesIO()
    images[1].save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is in the image ?"}]}]
    body = {"model": "tiny-random:llava", "messages": messages, "max_tokens": 6,
            "temperature": 0.9, "mitigation": {"method": "ritual"}}
    app = create_app(engine, ServerSettings(model="tiny-random:llava"))
    with serve_in_thread(app) as base:
        def post(**extra):
            response = httpx.post(base + "/v1/chat/completions", json={**body, **extra},
                                  timeout=120)
            assert response.status_code == 200, response.text
            return response

        first, second = post().json(), post().json()
        assert isinstance(first["seed"], int) and first["seed"] != second["seed"]
        replay = post(seed=first["seed"]).json()
        assert replay["seed"] == first["seed"]
        assert replay["choices"][0]["message"]["content"] == \
            first["choices"][0]["message"]["content"]
        want = engine.generate(images[1], "what is in the image ?", method="ritual",
                               max_new_tokens=6, do_sample=True, temperature=0.9,
                               seed=first["seed"])
        assert first["choices"][0]["message"]["content"] == want.text
        streamed = post(stream=True, seed=first["seed"]).text
        chunks = [json.loads(line[6:]) for line in streamed.splitlines()
                  if line.startswith("data: {")]
        assert {c["seed"] for c in chunks} == {first["seed"]}
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want.text
