"""A group of vLLM requests is never silently broken (run by `make test-vllm`).

One vLLM engine for the module, squeezed on purpose: a KV cache of about 1,100 tokens for 12
concurrent contrastive requests (the backend admits a group only when all its members fit, so
none is preempted or admitted alone), at most 5 running requests (an odd number: admitting
requests one at a time would split a pair), and a token budget of 96 tokens per step with prompts
of about 85 (chunked prefill: one member finishes its prefill a step before the other, and the
backend regroups). Every result must equal our engine's, and some group must have been regrouped
(or the test did not exert the pressure it claims).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

vllm = pytest.importorskip("vllm", reason="the vLLM suite runs in .venv-vllm (make test-vllm)")

import veridical  # noqa: E402
from veridical.tiny import save_tiny  # noqa: E402

LONG = ("describe this image in detail . is there a cup in the image ? how many objects are "
        "there ? what is on the table ? is there a dog in the image ? what color is the car ?")
SQUEEZE = {"enforce_eager": True, "max_model_len": 256, "kv_cache_memory_bytes": 1100 * 1024,
           "max_num_seqs": 5, "max_num_batched_tokens": 96, "enable_chunked_prefill": True,
           "block_size": 32}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_tiny("llava", tmp_path_factory.mktemp("llava") / "model", head_dim=32)
    ours = veridical.load(str(folder))
    theirs = veridical.load(str(folder), backend="vllm", **SQUEEZE)
    yield ours, theirs
    del theirs


def workload(n: int):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(n)]
    prompts = [LONG if i % 2 == 0 else "what is in the image ?" for i in range(n)]
    return imgs, prompts


@pytest.mark.parametrize("method,sample", [("vcd", False), ("ritual+vcd", True)])
def test_groups_stay_together_under_pressure(pair, method, sample):
    ours, theirs = pair
    imgs, prompts = workload(12)
    kwargs = dict(method=method, max_new_tokens=24, seed=list(range(12)), do_sample=sample,
                  ignore_eos=True)
    before = theirs.stats["regrouped"]
    got = theirs.generate(imgs, prompts, **kwargs)
    want = ours.generate(imgs, prompts, **kwargs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert theirs.stats["regrouped"] > before, "no group came apart: the squeeze did not bite"


def test_a_prompt_longer_than_the_step_budget_is_refused(pair):
    _, theirs = pair
    imgs, _ = workload(1)
    with pytest.raises(veridical.InputError, match="raise max_num_batched_tokens"):
        theirs.generate(imgs[0], " ".join([LONG] * 2), method="vcd", max_new_tokens=4)


def test_a_group_split_too_often_fails_loudly(pair, monkeypatch):
    from veridical.vllm import backend

    _, theirs = pair
    monkeypatch.setattr(backend, "MAX_REGROUPS", 0)
    imgs, prompts = workload(12)
    with pytest.raises(RuntimeError, match="raise max_num_seqs, max_num_batched_tokens or the KV"):
        theirs.generate(imgs, prompts, method="vcd", max_new_tokens=24, seed=0, ignore_eos=True)
    # the engine is left clean for the next call
    assert not theirs.core.has_unfinished_requests()
