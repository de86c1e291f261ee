"""The vLLM backend gives our engine's tokens, method by method (run by `make test-vllm`).

Each model starts one vLLM engine for the whole module (30-60 s on 2 cores). Reference: our own
engine on the same folder, whose contrastive methods are tested against the authors' formulas
elsewhere (tests/test_contrastive.py, tests/test_branches.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

vllm = pytest.importorskip("vllm", reason="the vLLM suite runs in .venv-vllm (make test-vllm)")

import veridical  # noqa: E402
from veridical.errors import InputError  # noqa: E402
from veridical.tiny import save_tiny  # noqa: E402

METHODS = ["none", "vcd", "icd", "m3id", "ritual", "pai_cfg", "ritual+vcd", "vcd+m3id"]
PROMPTS = ["what is in the image ?", "describe this image in detail .",
           "is there a cup in the image ?", "how many objects are there ?"]
VLLM_ARGS = {"enforce_eager": True, "max_model_len": 512}


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40 + 8 * i, 48, 3)) * 255).astype("uint8"))
            for i in range(n)]


@pytest.fixture(scope="module", params=["llava", "qwen2-vl"])
def pair(request, tmp_path_factory):
    """(our engine, the vLLM engine) on one saved tiny model with 32-wide heads."""
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model",
                       head_dim=32)
    ours = veridical.load(str(folder))
    theirs = veridical.load(str(folder), backend="vllm", **VLLM_ARGS)
    yield ours, theirs
    del theirs


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_every_method_gives_the_engines_tokens(pair, sample):
    ours, theirs = pair
    imgs = images(4)
    kwargs = dict(max_new_tokens=12, seed=[11, 12, 13, 14], do_sample=sample, temperature=0.9,
                  top_p=0.95)
    mismatches = []
    for method in METHODS:
        want = [r.token_ids for r in ours.generate(imgs, PROMPTS, method=method, **kwargs)]
        got = [r.token_ids for r in theirs.generate(imgs, PROMPTS, method=method, **kwargs)]
        if got != want:
            mismatches.append((method, want, got))
    assert not mismatches


def test_a_text_only_request_and_method_arguments(pair):
    ours, theirs = pair
    kwargs = dict(method="vcd+m3id", method_args={"vcd.alpha": 2.0, "m3id.lam": 0.5},
                  max_new_tokens=8, seed=5)
    prompts = ["what is in the image ?", "how many objects are there ?"]
    imgs = [images(1)[0], None]
    assert ([r.token_ids for r in theirs.generate(imgs, prompts, **kwargs)]
            == [r.token_ids for r in ours.generate(imgs, prompts, **kwargs)])


def test_results_match_field_by_field_with_logprobs_and_stops(pair):
    ours, theirs = pair
    img = images(1)[0]
    kwargs = dict(method="ritual", max_new_tokens=10, seed=3, logprobs=3)
    want = ours.generate(img, PROMPTS[1], **kwargs)
    got = theirs.generate(img, PROMPTS[1], **kwargs)
    assert (got.token_ids, got.text, got.finish_reason, got.prompt_tokens, got.image_tokens,
            got.seed) == (want.token_ids, want.text, want.finish_reason, want.prompt_tokens,
                          want.image_tokens, want.seed)
    assert len(got.logprobs) == len(want.logprobs) == len(want.token_ids)
    for a, b in zip(got.logprobs, want.logprobs):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # a stop string ends both at the same token
    text = want.text.split()
    if len(text) > 2:
        stop = text[2]
        a = ours.generate(img, PROMPTS[1], method="ritual", max_new_tokens=10, seed=3, stop=stop)
        b = theirs.generate(img, PROMPTS[1], method="ritual", max_new_tokens=10, seed=3, stop=stop)
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)


def test_plain_vllm_requests_in_the_same_batch_are_untouched(pair):
    ours, theirs = pair
    from vllm import SamplingParams

    img = images(1)[0]
    text = "describe this image in detail ."
    alone = theirs.llm.generate(["a cup on the table"],
                                SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                use_tqdm=False)
    want_plain = list(alone[0].outputs[0].token_ids)
    # a plain request enters the engine first, then a veridical call runs beside it
    theirs.core.add_request("plain-1", "a cup on the table",
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    got = theirs.generate([img, img], [text, text], method="vcd", max_new_tokens=10, seed=1)
    while theirs.core.has_unfinished_requests():  # our call may end first
        for out in theirs.core.step():
            theirs.others[out.request_id] = out
    plain = theirs.others.pop("plain-1")
    assert plain.finished and list(plain.outputs[0].token_ids) == want_plain
    want = ours.generate([img, img], [text, text], method="vcd", max_new_tokens=10, seed=1)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_streaming_and_cancel(pair):
    ours, theirs = pair
    img = images(1)[0]
    method = veridical.resolve("vcd")
    config = veridical.DecodingConfig(max_new_tokens=8)
    requests = [theirs.request(img, PROMPTS[0]), theirs.request(img, PROMPTS[1])]
    stream = theirs.stream(requests, method, config, [1, 2])
    seen: dict[int, list[int]] = {0: [], 1: []}
    done = {}
    for event in stream:
        if isinstance(event, veridical.TokenEvent):
            seen[event.request].append(event.token_id)
            if event.request == 1 and len(seen[1]) == 3:
                stream.cancel(1)
        else:
            done[event.request] = event.result
    assert done[1].finish_reason == "cancelled" and done[1].token_ids == seen[1][:3]
    want = ours.generate(img, PROMPTS[0], method="vcd", max_new_tokens=8, seed=1)
    assert seen[0] == done[0].token_ids == want.token_ids


@pytest.mark.parametrize("method", ["vhr", "opera", "pai", "vhr+vcd"])
def test_methods_vllm_cannot_run_name_themselves_and_the_backend_that_does(pair, method):
    _, theirs = pair
    with pytest.raises(InputError, match=r"cannot run on the vLLM backend.*without backend='vllm'"):
        theirs.generate(images(1)[0], PROMPTS[0], method=method, max_new_tokens=4)


def test_beam_search_is_refused(pair):
    _, theirs = pair
    with pytest.raises(InputError, match="beam search is not available on the vLLM backend"):
        theirs.generate(images(1)[0], PROMPTS[0], num_beams=3, max_new_tokens=4)


def test_the_server_runs_on_the_vllm_backend(pair):
    import base64
    import io

    import httpx

    from veridical.server import ServerSettings, create_app
    from veridical.server.background import serve_in_thread

    ours, theirs = pair
    img = images(1)[0]
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0, "seed": 4,
            "mitigation": {"method": "ritual+vcd"},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": PROMPTS[1]}]}]}
    app = create_app(theirs, ServerSettings(model="tiny", max_batch_size=4))
    with serve_in_thread(app) as base:
        plain = httpx.post(base + "/v1/chat/completions", json=body, timeout=300)
        streamed = httpx.post(base + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=300)
    assert plain.status_code == 200, plain.text
    want = ours.generate(img, PROMPTS[1], method="ritual+vcd", max_new_tokens=8, seed=4)
    assert plain.json()["choices"][0]["message"]["content"] == want.text
    assert plain.json()["usage"]["completion_tokens"] == want.completion_tokens
    pieces = [line.removeprefix("data: ") for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    import json

    text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in pieces
                   if json.loads(p).get("choices"))
    assert text == want.text


def test_the_eval_runner_runs_on_the_vllm_backend(pair, tmp_path):
    ours, theirs = pair
    config = dict(benchmark="pope", model="tiny", data="builtin:synthcoco", limit=2,
                  method="vcd", batch_size=3)
    a = veridical.evaluate(ours, veridical.EvalConfig(output=str(tmp_path / "ours"), **config),
                           quiet=True)
    b = veridical.evaluate(theirs, veridical.EvalConfig(output=str(tmp_path / "vllm"), **config),
                           quiet=True)
    assert b["run"]["backend"] == "vllm" and a["run"]["backend"] == "transformers"
    assert b["metrics"] == a["metrics"]
    rows = [[line for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
            for name in ("ours", "vllm")]
    assert sorted(rows[0]) == sorted(rows[1])
