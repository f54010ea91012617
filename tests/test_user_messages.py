"""No traceback where a user can reach: `serve` without gradio, `suggest-token` with no candidates."""
from __future__ import annotations

import sys

from .conftest import cli_in_process


def test_serve_without_gradio_says_how_to_install_it(capsys, monkeypatch, tiny_base, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError, as when missing
    run = cli_in_process(capsys, "serve", "--base", str(tiny_base), "--adapters", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip() == ("Error: the app needs gradio: pip install 'lora-dreambooth[app]' "
                                  "(or pip install gradio)")


def test_suggest_token_with_no_candidates_says_so_and_why(capsys, tiny_base):
    run = cli_in_process(capsys, "suggest-token", "--base", str(tiny_base), "--min-length", "9", "--max-length", "9")
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no candidate tokens in the tokenizer of"), run.stderr
    assert "--min-length/--max-length" in lines[0] and "Traceback" not in run.stderr
    found = cli_in_process(capsys, "suggest-token", "--base", str(tiny_base))
    assert found.returncode == 0 and "sks" in found.stdout
