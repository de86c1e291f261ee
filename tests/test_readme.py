"""Every ```python block of README.md runs as written, each on its own (a fresh namespace, in a
temporary working folder). The OpenAI-client blocks run against a server started here, whose
address they read from ``VERIDICAL_URL`` (the README's default is ``veridical serve``'s)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
MODEL = "builtin:synthcoco-llava"


def uses_server(block: str) -> bool:
    return "from openai import" in block


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5 and any(uses_server(b) for b in BLOCKS)


def block_id(block: str) -> str:
    """The block's last line; vLLM blocks start with "vllm" (`make test-vllm` picks them)."""
    last = block.strip().splitlines()[-1][:40]
    return f"vllm: {last}" if 'backend="vllm"' in block else last


@pytest.mark.parametrize("block", [b for b in BLOCKS if not uses_server(b)], ids=block_id)
def test_block_runs(block, tmp_path, monkeypatch, capsys):
    if 'backend="vllm"' in block:  # run by `make test-vllm`, in the environment that has vLLM
        pytest.importorskip("vllm", reason="a vLLM block: make test-vllm runs it")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every block shows something


@pytest.mark.parametrize("block", [b for b in BLOCKS if uses_server(b)],
                         ids=lambda b: b.strip().splitlines()[-1][:40])
def test_openai_block_runs_against_the_server(block, tmp_path, monkeypatch, capsys):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    import veridical
    from veridical.server import ServerSettings, create_app
    from veridical.server.background import serve_in_thread

    app = create_app(veridical.load(MODEL), ServerSettings(model=MODEL, api_key="KEY"))
    with serve_in_thread(app) as url:
        monkeypatch.setenv("VERIDICAL_URL", url + "/v1")
        monkeypatch.chdir(tmp_path)
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()
