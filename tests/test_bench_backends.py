"""``veridical bench backends``: the reference loop gives the engine's tokens, the rows carry
every measure and the tokens check, vLLM is reported skipped (with why) where it is missing, and
the command line rejects bad input in one line."""

from __future__ import annotations

import json
import sys

import pytest

from veridical import bench
from veridical.cli import main
from veridical.decoding.registry import resolve

ROW_FIELDS = {"contender", "method", "task", "batch_size", "requests", "max_new_tokens",
              "seconds", "tokens", "tokens_per_s", "first_token_s", "peak_memory_mb", "load_s",
              "tokens_match", "mismatched_requests", "throughput_vs_reference", "skipped"}


@pytest.mark.parametrize("method", ["none", "vcd"])
def test_reference_loop_gives_the_engines_tokens(method, images, prompts):
    from conftest import tiny_engine

    engine = tiny_engine("llava")
    results = engine.generate(images, prompts, method=method, max_new_tokens=8, seed=3)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        ids, first = bench.reference_generate(engine, engine.request(image, prompt, i),
                                              resolve(method), 8, 3)
        assert ids == results[i].token_ids
        assert first > 0


def test_reference_loop_runs_branch_and_combine_methods_only():
    assert bench.reference_unsupported(resolve("none")) is None
    assert bench.reference_unsupported(resolve("vcd")) is None
    assert "pai" in bench.reference_unsupported(resolve("pai"))  # attention edits
    assert "opera" in bench.reference_unsupported(resolve("opera"))  # its own search


def test_bench_rows_carry_the_measures_and_the_tokens_check(images, prompts, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    tasks = [bench.Task("caption", images[:3], prompts[:3], 4),
             bench.Task("pope", images[1:3], [p + " ?" for p in prompts[1:3]], 2)]
    result = bench.bench_backends("tiny-random:llava", tasks, methods=["none", "vcd"],
                                  batch_sizes=[2], repeats=1)
    assert result["device"] == "cpu" and "resident" in result["memory_measure"]
    ran = [r for r in result["rows"] if not r["skipped"]]
    # per method and task: the reference one request at a time, the engine at batch size 2
    assert [(r["contender"], r["batch_size"]) for r in ran[:2]] == [("reference", 1), ("engine", 2)]
    assert len(ran) == 2 * 2 * 2
    for r in ran:
        assert set(r) == ROW_FIELDS
        assert r["tokens_match"] and r["mismatched_requests"] == 0
        assert r["tokens"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["first_token_s"] > 0 and r["load_s"] > 0 and r["peak_memory_mb"] is not None
        assert r["throughput_vs_reference"] > 0
    assert all(r["throughput_vs_reference"] == 1 for r in ran if r["contender"] == "reference")
    assert [(c["method"], c["task"], c["all_match"]) for c in result["checks"]] == [
        ("none", "caption", True), ("none", "pope", True), ("vcd", "caption", True),
        ("vcd", "pope", True)]
    vllm = [r for r in result["rows"] if r["contender"] == "vllm"]
    assert len(vllm) == 2 * 2
    assert all("vLLM is not installed" in r["skipped"] for r in vllm)


def test_a_vllm_load_failure_is_a_skip_with_its_reason(monkeypatch):
    import types

    import veridical

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))

    def fails(ref, **kwargs):
        raise RuntimeError("no GPU\nmore detail")

    monkeypatch.setattr(veridical, "load", fails)
    backend, seconds, why = bench.load_vllm("tiny-random:llava")
    assert backend is None and why == "the vLLM backend failed to load tiny-random:llava: no GPU"


def test_peak_memory_on_cpu_sees_an_allocation():
    import time

    import torch

    with bench.PeakMemory(torch.device("cpu"), interval=0.001) as memory:
        block = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, every page written
        time.sleep(0.05)  # the sampler reads it
        del block
    assert memory.peak is not None and memory.peak > 32 * 2**20


@pytest.mark.parametrize("argv,message", [
    (["--contenders", "reference,foo"], "'foo' is not one; choose from reference, engine, vllm"),
    (["--contenders", "engine,engine"], "without repeats"),
    (["--batch-sizes", "1,x"], "give positive integers"),
    (["--batch-sizes", "0"], "give positive integers"),
    (["--methods", "vdc"], "unknown method 'vdc'"),
    (["--captions", "0", "--questions", "0"], "not both 0"),
    (["--repeats", "0"], "must be >= 1"),
    (["--output", "/no/such/folder/x.json"], "its folder does not exist"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    code = main(["bench", "backends", "--model", "tiny-random:llava", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "backends", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("builtin:synthcoco-llava", "none,vcd", "1,16", "reference,engine,vllm",
                    "(default: 32)"):
        assert default in out


def test_the_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "backends.json"
    assert main(["bench", "backends", "--model", "tiny-random:llava", "--captions", "1",
                 "--questions", "1", "--batch-sizes", "1", "--max-new-tokens", "3",
                 "--repeats", "1", "--contenders", "reference,engine", "--methods", "vcd",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "veridical bench backends" in printed and "tokens check, vcd / caption" in printed
    result = json.loads(out.read_text())
    assert {(r["contender"], r["task"]) for r in result["rows"]} == {
        ("reference", "caption"), ("engine", "caption"), ("reference", "pope"),
        ("engine", "pope")}
    assert all(c["all_match"] for c in result["checks"])
