"""DreamBench prompts: the bundled templates, filled with a token and class, and prompt files."""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.errors import first_line as _first_line

KINDS = ("object", "live")


class EvalPrompt(NamedTuple):
    """One evaluation prompt: what the pipeline is asked to draw and what CLIP-T compares the image with."""

    prompt: str
    clip_text: str


def _collapse_spaces(text: str) -> str:
    return " ".join(text.split())


def load_prompt_templates(kind: str) -> list[str]:
    """The 25 bundled DreamBench templates for ``kind`` ('object' or 'live'), with ``{unique_token}`` and
    ``{class_token}`` placeholders."""
    if kind not in KINDS:
        raise UserInputError(f"unknown subject kind '{kind}': use one of {', '.join(KINDS)}")
    data = json.loads(resources.files("lora_dreambooth").joinpath("assets/dreambench/prompts.json").read_text("utf-8"))
    return list(data[kind])


def fill_template(template: str, token: str, class_noun: str) -> EvalPrompt:
    """Fill one template. Lines without placeholders are taken as written; CLIP-T text drops the token."""
    if "{unique_token}" in template or "{class_token}" in template:
        prompt = template.replace("{unique_token}", token).replace("{class_token}", class_noun)
        clip_text = template.replace("{unique_token}", "").replace("{class_token}", class_noun)
        return EvalPrompt(_collapse_spaces(prompt), _collapse_spaces(clip_text))
    prompt = _collapse_spaces(template)
    return EvalPrompt(prompt, remove_token(prompt, token))


def remove_token(text: str, token: str) -> str:
    """``text`` with every whole-word occurrence of ``token`` removed ("a sks dog" -> "a dog")."""
    if not token.strip():
        return _collapse_spaces(text)
    return _collapse_spaces(re.sub(rf"(?<!\w){re.escape(token.strip())}(?!\w)", " ", text))


def dreambench_prompts(kind: str, token: str, class_noun: str) -> list[EvalPrompt]:
    """The 25 DreamBench prompts for a subject: ``("a sks dog in the jungle", "a dog in the jungle")``, ..."""
    if not class_noun.strip():
        raise UserInputError("the class noun is empty: DreamBench prompts need one (e.g. 'dog')")
    return [fill_template(t, token.strip(), class_noun.strip()) for t in load_prompt_templates(kind)]


def read_prompt_file(path: str | Path, token: str, class_noun: str) -> list[EvalPrompt]:
    """Prompts from a text file, one per line ('#' comments and blank lines skipped).

    Lines may use ``{unique_token}`` / ``{class_token}`` like the bundled DreamBench lists, or be plain
    prompts that already contain the token.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read prompt file '{file}': {_first_line(exc)}") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise UserInputError(f"prompt file '{file}' has no prompts (one per line)")
    return [fill_template(t, token.strip(), class_noun.strip()) for t in templates]


