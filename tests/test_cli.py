"""The command line: outputs, JSON, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from veridical.cli import main, parse_sets


def test_generate_prints_text(tmp_path, images, capsys):
    path = tmp_path / "a.png"
    images[0].save(path)
    code = main(["generate", "--model", "tiny-random:llava", "--image", str(path),
                 "--prompt", "what is this ?", "--max-new-tokens", "4", "--json"])
    assert code == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["completion_tokens"] == 4 and result["finish_reason"] == "length"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--image", "/no/such.png", "--prompt", "x"], "does not exist"),
        (["--prompt", "x", "--method", "vdc"], "unknown method 'vdc'"),
        (["--prompt", "x", "--set", "alpha"], "must look like key=value"),
        (["--prompt", "x", "--set", "alpha=1"], "has no parameter 'alpha'"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens=0 is invalid"),
        (["--prompt", "x", "--vllm-arg", "max_num_seqs=4"], "--vllm-arg needs --backend vllm"),
        (["--prompt", "x", "--backend", "vllm", "--vllm-arg", "oops"], "must look like KEY=VALUE"),
        (["--prompt", "x", "--backend", "vllm"], "16-wide attention heads"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    code = main(["generate", "--model", "tiny-random:llava", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert "none" in names


def test_methods_say_which_backend_runs_them(capsys):
    assert main(["methods", "--json", "--backend", "vllm"]) == 0
    on_vllm = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert on_vllm == {"none", "vcd", "icd", "m3id", "ritual", "pai_cfg"}


def test_bad_backend_arguments_get_clear_errors():
    import veridical
    from veridical.errors import InputError
    from veridical.server import ServerSettings

    with pytest.raises(InputError, match="backend='tpu' is not one of transformers, vllm"):
        veridical.load("tiny-random:llava", backend="tpu")
    with pytest.raises(InputError, match="max_num_seqs: unknown argument.*need backend='vllm'"):
        veridical.load("tiny-random:llava", max_num_seqs=4)
    with pytest.raises(ValueError, match="is not JSON"):
        ServerSettings(model="m", backend="vllm", vllm_args="{oops")
    with pytest.raises(ValueError, match="must be a JSON object"):
        ServerSettings(model="m", backend="vllm", vllm_args="[1]")
    with pytest.raises(ValueError, match="--vllm-args needs --backend vllm"):
        ServerSettings(model="m", vllm_args="{}").engine_args()


def test_bench_engine_reports_both_sides(capsys):
    assert main(["bench", "engine", "--model", "tiny-random:llava", "--batch-size", "1,2",
                 "--max-new-tokens", "3", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["engine_tokens"] == r["hf_tokens"] == 3 * r["batch_size"]
        assert r["time_ratio"] == pytest.approx(
            r["hf_tokens_per_s"] / r["engine_tokens_per_s"], rel=1e-9)


def test_parse_sets():
    assert parse_sets(["a=1", "vcd.beta = 0.2"]) == {"a": "1", "vcd.beta": "0.2"}


def test_bench_methods_reports_ratios_to_the_baseline(capsys):
    # 8 tokens, best of 2: the decoding after the first token outlasts the machine's noise
    assert main(["bench", "methods", "--model", "tiny-random:llava", "--batch-size", "2",
                 "--methods", "vcd,ritual,vcd:alpha=0", "--max-new-tokens", "8", "--repeats",
                 "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["none", "vcd", "ritual", "vcd:alpha=0", "none (eager)"]
    assert rows[0]["time_per_token_ratio"] == 1.0
    assert rows[0]["first_token_ratio"] == rows[0]["decode_per_token_ratio"] == 1.0
    assert all(r["tokens"] == 16 and r["time_per_token_ratio"] > 0 for r in rows)
    assert all(r["first_token_ratio"] > 0 and r["decode_per_token_ratio"] > 0 for r in rows)
    assert all(r["decode_timing"] == "timestamps" for r in rows)  # every contender streams
    assert rows[0]["decode_per_token_ratio_split"] == 1.0  # the other estimator, beside it


def test_bench_decode_timing_from_timestamps_and_its_fallback(images, prompts):
    from tests.conftest import tiny_engine
    from veridical import bench

    engine = tiny_engine("llava")
    tokens, decode = bench._method_call(engine, images[:2], prompts[:2], 5)
    assert tokens == 10 and decode > 0  # greedy: timed from the tokens' timestamps
    tokens, decode = bench._method_call(engine, images[:2], prompts[:2], 5, num_beams=2)
    assert tokens == 10 and decode is None  # beam search knows its tokens only at the end
    # rounds of (wall time, (tokens, decode s/token)); first-token calls decode nothing
    calls = {"none": [(1.0, (9, 0.10)), (1.2, (9, 0.20)), (0.9, (9, 0.10))],
             "a": [(1.5, (9, 0.15)), (1.1, (9, 0.24)), (1.4, (9, 0.40))],
             "beam": [(2.0, (9, None)), (1.8, (9, None)), (2.2, (9, None))]}
    calls |= {(name, "first"): [(0.5, (1, None))] * 3 for name in list(calls)}
    timed = bench._best(calls)
    assert bench._decode_ratio(calls, timed, "a", "none") == (pytest.approx(1.5), "timestamps")
    # the split estimator from the best calls: (1.8 - 0.5) / 8 against (0.9 - 0.5) / 8
    assert bench._decode_ratio(calls, timed, "beam", "none") == (pytest.approx(1.3 / 0.4),
                                                                "split")


def test_bench_method_specs_parse_and_name_a_bad_one():
    from veridical.bench import method_spec
    from veridical.errors import InputError

    assert method_spec("pai:gamma=1:alpha=0.5") == ("pai", {"gamma": "1", "alpha": "0.5"})
    assert method_spec("vcd") == ("vcd", {})
    with pytest.raises(InputError, match="'gamma' is not KEY=VALUE"):
        method_spec("pai:gamma")
