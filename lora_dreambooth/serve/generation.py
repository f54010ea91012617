"""Generation requests (validated against per-request limits) and results, saved with their settings."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.atomic import atomic_path
from lora_dreambooth.files.grids import image_grid
from lora_dreambooth.serve.library import check_subject_name


# ---------------------------------------------------------------------------------------------------------------
# Generation requests and results
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationLimits:
    """What a request may ask for (the app and the CLI refuse anything else with a readable message)."""

    max_steps: int = 150
    max_images: int = 8
    min_side: int = 8
    max_side: int = 2048
    max_guidance: float = 30.0
    max_weight: float = 2.0
    max_prompt_chars: int = 2000
    max_adapters: int = 4


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt, settings, and the adapters to apply as ``(name, weight)`` (empty: base model)."""

    prompt: str
    negative_prompt: str = ""
    adapters: tuple[tuple[str, float], ...] = ()
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    num_images: int = 1
    height: int | None = None  # None: the model's native size
    width: int | None = None

    def validated(self, limits: GenerationLimits = GenerationLimits()) -> "GenerationRequest":
        """This request with types normalised; raises :class:`UserInputError` naming the bad setting."""
        prompt = str(self.prompt or "").strip()
        _require(bool(prompt), "the prompt is empty")
        _require(len(prompt) <= limits.max_prompt_chars,
                 f"the prompt is longer than {limits.max_prompt_chars} characters")
        _require(len(str(self.negative_prompt or "")) <= limits.max_prompt_chars,
                 f"the negative prompt is longer than {limits.max_prompt_chars} characters")
        steps, num_images, seed = _as_int(self.steps, "steps"), _as_int(self.num_images, "number of images"), \
            _as_int(self.seed, "seed")
        _require(1 <= steps <= limits.max_steps, f"steps must be between 1 and {limits.max_steps} (got {steps})")
        _require(1 <= num_images <= limits.max_images,
                 f"number of images must be between 1 and {limits.max_images} (got {num_images})")
        _require(0 <= seed < 2**63, f"seed must be between 0 and 2^63-1 (got {seed})")
        guidance = _as_float(self.guidance, "guidance")
        _require(0 <= guidance <= limits.max_guidance, f"guidance must be between 0 and {limits.max_guidance}")
        sides = []
        for label, value in (("height", self.height), ("width", self.width)):
            side = None if value in (None, "", 0) else _as_int(value, label)
            _require(side is None or (limits.min_side <= side <= limits.max_side and side % 8 == 0),
                     f"{label} must be a multiple of 8 between {limits.min_side} and {limits.max_side} (got {side})")
            sides.append(side)
        adapters = tuple(self.adapters)
        _require(len(adapters) <= limits.max_adapters, f"at most {limits.max_adapters} subjects can be mixed")
        cleaned = []
        for name, weight in adapters:
            weight = _as_float(weight, f"strength of '{name}'")
            _require(abs(weight) <= limits.max_weight,
                     f"strength of '{name}' must be between -{limits.max_weight} and {limits.max_weight}")
            cleaned.append((check_subject_name(name), weight))
        _require(len({n for n, _ in cleaned}) == len(cleaned), "the same subject is chosen twice")
        return replace(self, prompt=prompt, negative_prompt=str(self.negative_prompt or "").strip(),
                       adapters=tuple(cleaned), steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                       height=sides[0], width=sides[1])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


def _as_int(value: Any, label: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{label} must be a whole number (got {value!r})") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise UserInputError(f"{label} must be a whole number (got {value!r})")
    return int(number)


def _as_float(value: Any, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{label} must be a number (got {value!r})") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UserInputError(f"{label} must be a finite number (got {value!r})")
    return number


@dataclass
class GenerationResult:
    """Images of one request (seeds ``seed``, ``seed+1``, ...) and what made them."""

    images: list[Image.Image]
    request: GenerationRequest
    base: str
    seconds: float

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + i for i in range(len(self.images))]

    def settings(self, index: int = 0) -> dict[str, Any]:
        """Everything needed to reproduce image ``index`` (stored in its PNG text)."""
        from lora_dreambooth.version import __version__

        req = self.request
        return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
                "guidance": req.guidance, "seed": self.seeds[index], "height": self.images[index].height,
                "width": self.images[index].width, "adapters": [{"name": n, "weight": w} for n, w in req.adapters],
                "base": self.base, "generator": f"lora-dreambooth {__version__}"}


def png_info(settings: dict[str, Any]) -> PngInfo:
    """PNG text chunks: ``prompt``, ``negative_prompt``, a JSON ``lora_dreambooth`` block and an A1111-style
    ``parameters`` line (which many image tools display)."""
    info = PngInfo()
    info.add_text("prompt", settings["prompt"])
    info.add_text("negative_prompt", settings["negative_prompt"])
    info.add_text("lora_dreambooth", json.dumps(settings, sort_keys=True))
    loras = "".join(f" <lora:{a['name']}:{a['weight']:g}>" for a in settings["adapters"])
    info.add_text("parameters", f"{settings['prompt']}{loras}\nNegative prompt: {settings['negative_prompt']}\n"
                                f"Steps: {settings['steps']}, CFG scale: {settings['guidance']:g}, "
                                f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
                                f"Model: {settings['base']}")
    return info


def save_generation(result: GenerationResult, out_dir: str | Path, *, grid: bool = True) -> list[Path]:
    """Write ``image-NN-seedS.png`` files with their settings as PNG text, and ``grid.png``; atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        settings = result.settings(i)
        path = out / f"image-{i:02d}-seed{settings['seed']}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=png_info(settings))
        paths.append(path)
    if grid:
        with atomic_path(out / "grid.png") as tmp:
            image_grid(result.images).save(tmp, format="PNG", pnginfo=png_info(result.settings(0)))
        paths.append(out / "grid.png")
    return paths


