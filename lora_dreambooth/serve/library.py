"""A folder of adapters: find them, read their metadata without loading weights, notice changes."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.load_adapter import _read_summary_or_fail
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, PICKLE_SUFFIXES, resolve_adapter_file

log = logging.getLogger(__name__)
BASE_ONLY = "(base model)"  # the subject choice that means "no adapter"
PREVIEW_NAMES = ("preview.png", "samples.png", "preview.jpg", "samples.jpg")


# ---------------------------------------------------------------------------------------------------------------
# A folder of adapters
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of a library: where it is and what its metadata says (no weights loaded)."""

    name: str
    file: Path
    summary: dict[str, Any]
    preview: Path | None
    stamp: tuple[int, int]  # (mtime_ns, size): a change means the file was replaced

    @property
    def token(self) -> str | None:
        return self.summary.get("token")

    @property
    def class_noun(self) -> str | None:
        return self.summary.get("class_noun")

    @property
    def instance_prompt(self) -> str:
        """The subject's instance prompt (the app offers it as the prompt), or a generic one."""
        prompt = self.summary.get("instance_prompt")
        if prompt:
            return str(prompt)
        if self.token and self.class_noun:
            return f"a photo of {self.token} {self.class_noun}"
        return "a photo"

    @property
    def base_model(self) -> str | None:
        return self.summary.get("base_model")

    @property
    def variant(self) -> str:
        return str(self.summary.get("variant", "lora"))

    @property
    def label(self) -> str:
        """Dropdown label: token and class, then the library name (``sks dog · my-dog``)."""
        subjects = [s for s in self.summary.get("subjects") or [] if isinstance(s, dict)]
        if subjects:
            what = " + ".join(f"{s.get('token', '?')} {s.get('class_noun', '?')}" for s in subjects)
        elif self.token:
            what = f"{self.token} {self.class_noun or ''}".strip()
        else:
            return f"{self.name} (no metadata)"
        return f"{what} · {self.name}"


@dataclass
class LibraryChanges:
    """What a :meth:`AdapterLibrary.refresh` found."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class AdapterLibrary:
    """The adapters in one folder: each sub-folder holding ``pytorch_lora_weights.safetensors``, and loose
    ``.safetensors`` files. Names are the sub-folder names (or file stems); they are keys, never paths.

    Metadata is read from the safetensors header only. Broken files are skipped with a warning and listed in
    :attr:`problems`. Pickle files are never picked up.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise UserInputError(f"adapter library '{self.folder}' is not a folder")
        self._entries: dict[str, AdapterEntry] = {}
        self.problems: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> LibraryChanges:
        """Rescan the folder; re-read metadata of new or replaced files only."""
        found: dict[str, tuple[Path, tuple[int, int]]] = {}
        for name, file in self._candidates():
            try:
                stat = file.stat()
            except OSError:
                continue
            found[name] = (file, (stat.st_mtime_ns, stat.st_size))
        changes = LibraryChanges(removed=sorted(set(self._entries) - set(found)))
        for name in changes.removed:
            del self._entries[name]
        problems: dict[str, str] = {}
        for name, (file, stamp) in sorted(found.items()):
            old = self._entries.get(name)
            if old is not None and old.stamp == stamp and old.file == file:
                continue
            if name in self.problems and self.problems[name].startswith(f"{stamp}"):
                problems[name] = self.problems[name]  # same broken file: do not warn again
                continue
            try:
                entry = self._read_entry(name, file, stamp)
            except UserInputError as exc:
                log.warning("skipping adapter '%s': %s", name, exc)
                problems[name] = f"{stamp} {exc}"
                self._entries.pop(name, None)
                continue
            (changes.changed if old is not None else changes.added).append(name)
            self._entries[name] = entry
        self.problems = problems
        return changes

    def _candidates(self) -> Iterator[tuple[str, Path]]:
        """(name, file) pairs; a loose file whose stem clashes with a sub-folder keeps its suffix in the name."""
        children = sorted(p for p in self.folder.iterdir() if not p.name.startswith("."))
        folders = {p.name for p in children if p.is_dir() and (p / ADAPTER_FILENAME).is_file()}
        for child in children:
            if child.name == BASE_ONLY:
                continue
            if child.name in folders:
                yield child.name, child / ADAPTER_FILENAME
            elif child.is_file() and child.suffix.lower() == ".safetensors":
                yield (child.name if child.stem in folders else child.stem), child
            elif child.is_file() and child.suffix.lower() in PICKLE_SUFFIXES:
                log.debug("library: ignoring pickle file '%s'", child)

    def _read_entry(self, name: str, file: Path, stamp: tuple[int, int]) -> AdapterEntry:
        resolve_adapter_file(file)  # validates the header and size without reading tensors
        summary = _read_summary_or_fail(file)
        return AdapterEntry(name=name, file=file, summary=summary, preview=self._preview_for(file), stamp=stamp)

    @staticmethod
    def _preview_for(file: Path) -> Path | None:
        if file.name == ADAPTER_FILENAME:
            candidates = [file.parent / n for n in PREVIEW_NAMES]
        else:
            candidates = [file.with_suffix(".png"), file.with_suffix(".jpg"), file.parent / f"{file.stem}.preview.png"]
        return next((c for c in candidates if c.is_file()), None)

    # -- lookup -----------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return [self._entries[n] for n in self.names]

    def get(self, name: str) -> AdapterEntry:
        """The entry called ``name``; a path, a traversal attempt or an unknown name is a one-line error."""
        check_subject_name(name)
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names) or "none"
            raise UserInputError(f"unknown subject '{name}' (library '{self.folder}' has: {known})") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[AdapterEntry]:
        return iter(self.entries())


def check_subject_name(name: Any) -> str:
    """Subjects are chosen by library name only: refuse paths, traversal and control characters."""
    if not isinstance(name, str) or not name.strip():
        raise UserInputError("choose a subject")
    if len(name) > 200 or any(c in name for c in "/\\\0") or name.startswith(("~", ".")) or ".." in name \
            or re.match(r"^[A-Za-z]:", name) or any(ord(c) < 32 for c in name):
        raise UserInputError(f"subject {name[:80]!r} is not a library name (paths are not accepted)")
    return name


