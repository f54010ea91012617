"""Subjects of a run: one (the usual `--token`/`--class-noun`) or several from TOML `[[subjects]]` entries.

Every subject brings its folder, token, class noun and prompts. Prompts never mix subjects: a subject's
instance prompt and captions may name only its own token, and class prompts name no token at all. Subjects
with the same class prompt share one class-image folder. With `--separate-adapters` the run trains one
ordinary adapter per subject into `OUT/<name>/`, one after the other, reusing the class images it generated.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lora_dreambooth.config import (DEFAULT_INSTANCE_PROMPT, SubjectConfig, TrainConfig, class_prompt_templates,
                                    fill_prompt)
from lora_dreambooth.data.captions import mentions, photo_prompts
from lora_dreambooth.data.examples import Example, load_examples
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import ADAPTER_FILENAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """One subject with its prompts filled in."""

    index: int
    name: str
    token: str
    class_noun: str
    instance_dir: str
    instance_prompt: str
    class_prompt: str  # the first class prompt
    class_dir: str | None
    class_prompts: tuple[str, ...] = ()  # every class prompt (the class images are split across them)


def resolve_subjects(cfg: TrainConfig) -> list[Subject]:
    """The run's subjects (the `[[subjects]]` entries, or one from the top-level options), prompts checked."""
    entries = cfg.subjects or (SubjectConfig(cfg.instance_dir, cfg.token, cfg.class_noun, class_dir=cfg.class_dir),)
    subjects = []
    for index, entry in enumerate(entries):
        instance_template = entry.instance_prompt or cfg.instance_prompt or DEFAULT_INSTANCE_PROMPT
        templates = (entry.class_prompt,) if entry.class_prompt else class_prompt_templates(cfg.class_prompt)
        class_prompts = tuple(dict.fromkeys(fill_prompt(t, entry.token, entry.class_noun) for t in templates))
        subjects.append(Subject(index, entry.label, entry.token, entry.class_noun, entry.instance_dir,
                                fill_prompt(instance_template, entry.token, entry.class_noun),
                                class_prompts[0], entry.class_dir, class_prompts))
    _check_prompts(subjects)
    return subjects


def _check_prompts(subjects: list[Subject]) -> None:
    folders: dict[Path, str] = {}
    for subject in subjects:
        for other in subjects:
            for class_prompt in subject.class_prompts or (subject.class_prompt,):
                if mentions(class_prompt, other.token):
                    raise UserInputError(f"class prompt '{class_prompt}' names the token '{other.token}'; "
                                         f"class prompts describe the class only (e.g. 'a photo of {{class}}')")
            if other is not subject and mentions(subject.instance_prompt, other.token):
                raise UserInputError(f"instance prompt '{subject.instance_prompt}' of subject '{subject.name}' names "
                                     f"'{other.token}', the token of subject '{other.name}'")
        if not mentions(subject.instance_prompt, subject.token):
            log.warning("instance prompt '%s' does not contain the token '%s': the subject gets no name",
                        subject.instance_prompt, subject.token)
        folder = Path(subject.instance_dir).expanduser().resolve()
        if folder in folders:
            raise UserInputError(f"subjects '{folders[folder]}' and '{subject.name}' use the same instance folder "
                                 f"'{subject.instance_dir}'")
        folders[folder] = subject.name


def load_subject_examples(cfg: TrainConfig, subjects: list[Subject]) -> list[Example]:
    """Every subject's photos with their prompts (captions or the instance prompt) and, with masks, their masks."""
    examples: list[Example] = []
    for subject in subjects:
        what = "instance folder" if len(subjects) == 1 else f"instance folder of subject '{subject.name}'"
        prompts = partial(photo_prompts, instance_prompt=subject.instance_prompt, token=subject.token,
                          class_noun=subject.class_noun, use_captions=cfg.captions)
        loaded = load_examples(subject.instance_dir, subject.instance_prompt, cfg.resolution, what=what,
                               skip_bad=cfg.skip_bad_images, prompts=prompts, masks=cfg.masked_loss,
                               subject=subject.index)
        for example in loaded:
            for other in subjects:
                if other is not subject and mentions(example.prompt, other.token):
                    raise UserInputError(f"the caption of '{example.path}' names '{other.token}', the token of "
                                         f"subject '{other.name}'; a photo may name only its own subject's token")
        examples += loaded
    if cfg.masked_loss:
        unmasked = [e.path.name for e in examples if e.mask is None]
        if unmasked:
            log.warning("masked loss: %d of %d photos have no mask (photo.mask.png or alpha channel) and count "
                        "everywhere: %s", len(unmasked), len(examples), ", ".join(unmasked[:5]))
    return examples


def class_image_sets(subjects: list[Subject], num_class_images: int) -> list[tuple[str, str | None, int]]:
    """The distinct (class prompt, class folder, image count) sets: subjects of one class share their class images.

    A subject with several class prompts splits its `num_class_images` across them (the first prompts get one more
    when it does not divide); with its own class folder, each prompt gets a numbered sub-folder of it.
    """
    seen: dict[tuple[str, str | None], int] = {}
    for subject in subjects:
        prompts = subject.class_prompts or (subject.class_prompt,)
        share, extra = divmod(num_class_images, len(prompts))
        for i, prompt in enumerate(prompts):
            folder = subject.class_dir
            if folder is not None and len(prompts) > 1:
                folder = str(Path(folder) / f"prompt-{i:02d}")
            seen.setdefault((prompt, folder), share + (i < extra))
    return [(prompt, folder, count) for (prompt, folder), count in seen.items() if count > 0]


def subjects_summary(subjects: list[Subject], examples: list[Example]) -> list[dict[str, Any]]:
    """The `subjects` list of the adapter metadata."""
    counts = Counter(e.subject for e in examples)
    return [{"name": s.name, "token": s.token, "class_noun": s.class_noun, "instance_prompt": s.instance_prompt,
             "class_prompt": s.class_prompt, **({"class_prompts": list(s.class_prompts)} if len(s.class_prompts) > 1
                                                else {}), "num_instance_images": counts[s.index]} for s in subjects]


def folder_name(label: str) -> str:
    """A safe sub-folder name for a subject."""
    return re.sub(r"[^\w.-]+", "-", label).strip(".-") or "subject"


def subject_run_configs(config: TrainConfig) -> list[TrainConfig]:
    """--separate-adapters: one single-subject config per `[[subjects]]` entry, writing to `OUT/<name>/`."""
    out = Path(config.output_dir)
    configs, names = [], set()
    for entry in config.subjects:
        name = folder_name(entry.label)
        if name in names:
            raise UserInputError(f"two subjects would write to the same folder '{out / name}'; "
                                 f"give them distinct names")
        names.add(name)
        configs.append(config.replace(subjects=(entry,), instance_dir=entry.instance_dir, token=entry.token,
                                      class_noun=entry.class_noun, output_dir=str(out / name),
                                      separate_adapters=False))
    if not (config.overwrite or config.resume):
        for sub in configs:
            if (Path(sub.output_dir) / ADAPTER_FILENAME).exists():
                raise UserInputError(f"output folder '{sub.output_dir}' already holds a finished adapter; pass "
                                     f"--overwrite to replace it or choose another --output")
    return configs


