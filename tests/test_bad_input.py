"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import pytest

import veridical
from tests.conftest import tiny_engine
from veridical.errors import InputError, UnsupportedModelError


def test_missing_image_file(tmp_path):
    engine = tiny_engine("llava")
    with pytest.raises(InputError, match=r"image file '.*nope.png' does not exist"):
        engine.generate(tmp_path / "nope.png", "what is this ?")


def test_non_image_bytes(tmp_path):
    bad = tmp_path / "fake.jpg"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(InputError, match=r"fake.jpg' is not an image PIL can read"):
        tiny_engine("llava").generate(bad, "what is this ?")


def test_truncated_image(tmp_path, images):
    path = tmp_path / "cut.png"
    images[0].save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match=r"cut.png"):
        tiny_engine("llava").generate(path, "what is this ?")


def test_image_for_text_only_model(images):
    engine = veridical.load("tiny-random:llama")
    with pytest.raises(InputError, match=r"text-only and cannot take an image"):
        engine.generate(images[0], "hello there")
    assert engine.generate(None, "hello there", max_new_tokens=3).completion_tokens == 3


def test_unknown_method_and_bad_parameter(images):
    engine = tiny_engine("llava")
    with pytest.raises(ValueError, match=r"unknown method 'vdc'"):
        engine.generate(images[0], "what ?", method="vdc")
    with pytest.raises(ValueError, match=r"method 'none' has no parameter 'alpha'"):
        engine.generate(images[0], "what ?", method="none", method_args={"alpha": 1})


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt(images, prompt):
    with pytest.raises(InputError, match=r"prompt is empty"):
        tiny_engine("llava").generate([images[0]], [prompt])


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"max_new_tokens": 0}, r"max_new_tokens=0 is invalid"),
        ({"temperature": 0.0, "do_sample": True}, r"temperature=0.0 is invalid"),
        ({"top_p": 1.5}, r"top_p=1.5 is invalid.*0 < top_p <= 1"),
        ({"top_k": -1}, r"top_k=-1 is invalid"),
        ({"num_beams": 2, "do_sample": True}, r"beam sampling is not supported"),
        ({"stop": [""]}, r"stop=.* is invalid"),
        ({"seed": "x"}, r"seed='x' must be an integer"),
    ],
)
def test_bad_decoding_settings(images, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        tiny_engine("llava").generate(images[0], "what ?", **kwargs)


def test_mismatched_batch(images):
    with pytest.raises(InputError, match=r"got 2 images for 1 prompts"):
        tiny_engine("llava").generate(images[:2], ["what ?"])


def test_unknown_model_references(tmp_path):
    with pytest.raises(InputError, match=r"unknown tiny architecture 'gpt'.*tiny-random:llava"):
        veridical.load("tiny-random:gpt")
    with pytest.raises(InputError, match=r"folder without config.json"):
        veridical.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnsupportedModelError, match=r"'bert' is not supported.*llava"):
        veridical.load(str(tmp_path))
    with pytest.raises(InputError, match=r"dtype='float33'"):
        veridical.load("tiny-random:llava", dtype="float33")
    with pytest.raises(InputError, match=r"model folder '\./no-such-folder' does not exist"):
        veridical.load("./no-such-folder")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_an_unknown_hub_id_offline_fails_at_once(monkeypatch, variable):
    import time

    import transformers.modeling_utils  # noqa: F401  (imports are not what is timed)

    monkeypatch.setenv(variable, "1")
    started = time.monotonic()
    with pytest.raises(InputError, match=rf"not in the Hugging Face cache while {variable}=1 "
                                         r"\(offline mode\)\. Use a local folder"):
        veridical.load("no-such-org/no-such-model")
    assert time.monotonic() - started < 3


def test_an_unknown_hub_id_with_an_unreachable_hub_fails_at_once(monkeypatch):
    import socket
    import time

    import transformers.modeling_utils  # noqa: F401
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as sock:  # a loopback port nobody listens on: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(InputError, match=rf"the hub \(http://127.0.0.1:{port}\) cannot be "
                                         "reached"):
        veridical.load("no-such-org/no-such-model")
    assert time.monotonic() - started < 3 + veridical.loading.HUB_CHECK_S
