"""`TrainConfig`: the one typed description of a training run.

The same dataclass is filled from the command line, from a TOML file (`--config`), from Python, and is written
back into `train_config.toml` beside the adapter and into the adapter file's metadata. Validation happens on
creation, so a bad value fails before any model is loaded, with one line naming the option.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from lora_dreambooth.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CROPS = ("center", "random")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
VARIANTS = ("lora", "dora", "rslora", "loha", "lokr")
INITS = ("gaussian", "pissa", "olora")  # LoRA-family initialisations
EXPORT_FORMATS = ("kohya",)
PRIOR_MODES = ("images", "model")
PROFILES = ("auto", "fast", "low-memory", "plain")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_INSTANCE_PROMPT = "a photo of {token} {class}"
DEFAULT_CLASS_PROMPT = "a photo of {class}"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
STEPS_PER_IMAGE = 100
MAX_DEFAULT_STEPS = 1500


@dataclass
class SubjectConfig:
    """One subject of a multi-subject run: a `[[subjects]]` entry of the TOML config."""

    instance_dir: str
    token: str
    class_noun: str
    name: str | None = None  # default: the token; names the sub-folder with --separate-adapters
    instance_prompt: str | None = None  # default: the run's instance_prompt
    class_prompt: str | None = None  # default: the run's class_prompt
    class_dir: str | None = None  # default: the class-image cache folder of this subject's class prompt

    @property
    def label(self) -> str:
        """The subject's name (its token unless `name` is set)."""
        return self.name or self.token

    def to_dict(self) -> dict[str, Any]:
        """Plain dict without None values (TOML has no null)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_value(cls, value: Any, where: str) -> "SubjectConfig":
        """Build from a TOML table (or pass a SubjectConfig through), naming the entry in errors."""
        if isinstance(value, cls):
            return value
        _require(isinstance(value, Mapping), f"{where} must be a table with instance_dir, token and class_noun")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        _require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = [k for k in ("instance_dir", "token", "class_noun") if not str(value.get(k) or "").strip()]
        _require(not missing, f"{where}: missing {', '.join(missing)}")
        return cls(**{k: (str(v) if v is not None else None) for k, v in value.items()})


@dataclass
class TrainConfig:
    """Every option of `lora-dreambooth train`. Field names are the TOML keys; CLI flags use dashes."""

    instance_dir: str
    base: str
    token: str
    class_noun: str
    output_dir: str
    instance_prompt: str | None = None  # default: "a photo of {token} {class}"
    # default: "a photo of {class}"; several prompts (TOML list, repeated --class-prompt) split the class images
    class_prompt: str | tuple[str, ...] | None = None
    # adapter
    variant: str = "lora"
    rank: int = 4
    alpha: float | None = None  # default: = rank
    train_text_encoder: bool = True
    unet_target_modules: tuple[str, ...] = UNET_TARGETS
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGETS
    init: str = "gaussian"  # pissa/olora: start from the base weights' principal/QR factors (lora, dora, rslora)
    # pivotal tuning: the token gets its own trained input embedding (saved as embeddings.safetensors)
    pivotal: bool = False
    init_token: str | None = None  # default: the class noun
    embedding_lr: float | None = None  # default: = text_encoder_lr, else lr
    # prior preservation
    prior: bool = True
    prior_mode: str = "images"
    prior_weight: float = 1.0
    class_dir: str | None = None  # default: a cache folder keyed by base + class prompt + resolution
    num_class_images: int = 100
    class_inference_steps: int = 10  # DPM-Solver++ 2M Karras: as close to converged as plain 2M at 12
    # optimisation
    steps: int | None = None  # default: 100 per instance image, capped at 1500
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 1e-4
    scale_lr: bool = False  # multiply lr by the effective batch (processes x batch x accumulation)
    text_encoder_lr: float | None = None  # default: = lr
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # bf16 on GPUs that have it, fp16 on older GPUs, no (fp32) on CPU
    gradient_checkpointing: bool = False
    profile: str = "auto"
    compile: bool = False
    max_vram: str | None = None  # e.g. "4GB": with profile auto, the fastest settings predicted to fit
    # data
    resolution: int = 512
    crop: str = "center"
    flip: bool = False
    latent_cache: bool = True  # keep encoded latents in the user cache folder; a rerun on the same images loads them
    skip_bad_images: bool = False
    seed: int = 0
    # run management
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    save_dtype: str = "fp16"
    log_every: int = 10
    progress_file: str | None = None  # JSON lines of step / total / loss / ETA (the app's training jobs read it)
    sample_prompts: tuple[str, ...] = ()
    allow_pickle: bool = False
    export: tuple[str, ...] = ()  # extra layouts written beside the adapter: "kohya"
    # several subjects in one run (TOML `[[subjects]]` entries; the first one fills instance_dir/token/class_noun)
    subjects: tuple[SubjectConfig, ...] = ()
    separate_adapters: bool = False
    # data features
    captions: bool = True  # photo.txt / photo.caption beside photo.jpg
    caption_dropout: float = 0.0  # probability of training a photo with the instance prompt instead of its caption
    buckets: bool = False  # aspect-ratio buckets instead of square crops
    masked_loss: bool = False  # weight the loss by photo.mask.png or the photo's alpha channel
    # loss
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023); 5.0 is the paper's choice
    noise_offset: float = 0.0
    prediction_type: str | None = None  # default: the base scheduler's
    # validation images during training
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 0  # 0: never
    validation_inference_steps: int = 25

    def __post_init__(self) -> None:
        self.unet_target_modules = _as_tuple(self.unet_target_modules)
        self.text_encoder_target_modules = _as_tuple(self.text_encoder_target_modules)
        self.sample_prompts = _as_tuple(self.sample_prompts)
        self.export = _as_tuple(self.export)
        self.validation_prompts = _as_tuple(self.validation_prompts)
        self.class_prompt = _one_or_tuple(self.class_prompt)
        self.subjects = tuple(SubjectConfig.from_value(s, f"[[subjects]] entry {i}")
                              for i, s in enumerate(self.subjects or (), 1))
        if self.alpha is None:
            self.alpha = float(self.rank)
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`UserInputError` naming the first bad option."""
        token = (self.token or "").strip()
        noun = (self.class_noun or "").strip()
        _require(bool(token), "--token must not be empty (pick a rare word such as 'sks')")
        _require(bool(noun), "--class-noun must not be empty (e.g. 'dog', 'person', 'backpack')")
        _require(token.lower() != noun.lower(),
                 f"--token '{token}' equals --class-noun: the token must be a rare word that names this subject only")
        _require(self.rank > 0, f"--rank must be a positive integer, got {self.rank}")
        _require(self.alpha > 0, f"--alpha must be positive, got {self.alpha}")
        _require(self.resolution > 0 and self.resolution % 8 == 0,
                 f"--resolution must be a positive multiple of 8, got {self.resolution}")
        _require(self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}")
        _require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(self.text_encoder_lr is None or self.text_encoder_lr > 0,
                 f"--text-encoder-lr must be positive, got {self.text_encoder_lr}")
        _require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _require(self.gradient_accumulation > 0, f"--gradient-accumulation must be positive, got {self.gradient_accumulation}")
        _require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _require(self.num_class_images >= 0, f"--num-class-images must be >= 0, got {self.num_class_images}")
        _require(self.class_inference_steps > 0, f"--class-inference-steps must be positive, got {self.class_inference_steps}")
        _require(self.prior_weight >= 0, f"--prior-weight must be >= 0, got {self.prior_weight}")
        _require(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        _require(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0,
                 f"--checkpoints-total-limit must be positive, got {self.checkpoints_total_limit}")
        _require(self.log_every > 0, f"--log-every must be positive, got {self.log_every}")
        _require(bool(self.unet_target_modules), "unet_target_modules must name at least one module")
        for name, value, allowed in (
            ("--mixed-precision", self.mixed_precision, MIXED_PRECISIONS),
            ("--optimizer", self.optimizer, OPTIMIZERS),
            ("--lr-scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("--crop", self.crop, CROPS),
            ("--save-dtype", self.save_dtype, SAVE_DTYPES),
            ("--variant", self.variant, VARIANTS),
            ("--init", self.init, INITS),
            ("--prior-mode", self.prior_mode, PRIOR_MODES),
            ("--profile", self.profile, PROFILES),
        ):
            _require(value in allowed, f"{name} must be one of {', '.join(allowed)}; got '{value}'")
        if self.max_vram is not None:
            parse_size(self.max_vram, option="--max-vram")
            _require(self.profile == "auto",
                     f"--max-vram chooses the profile itself; leave --profile at auto (got '{self.profile}')")
        for fmt in self.export:
            _require(fmt in EXPORT_FORMATS, f"--export must be one of {', '.join(EXPORT_FORMATS)}; got '{fmt}'")
        _require(self.init == "gaussian" or self.variant in ("lora", "dora", "rslora"),
                 f"--init {self.init} works with --variant lora, dora or rslora, not {self.variant}")
        self._validate_features()
        self._validate_pivotal()
        self._validate_subjects()

    def _validate_features(self) -> None:
        _require(0.0 <= self.caption_dropout <= 1.0,
                 f"--caption-dropout must be between 0 and 1, got {self.caption_dropout}")
        _require(self.snr_gamma is None or self.snr_gamma > 0, f"--snr-gamma must be positive, got {self.snr_gamma}")
        _require(self.noise_offset >= 0, f"--noise-offset must be >= 0, got {self.noise_offset}")
        _require(self.prediction_type is None or self.prediction_type in PREDICTION_TYPES,
                 f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}; got '{self.prediction_type}'")
        _require(self.crop == "center" or not self.buckets,
                 "--crop random cuts square windows; --buckets keeps each photo's aspect ratio instead: use one")
        _require(self.crop == "center" or not self.masked_loss,
                 "--crop random does not move --masked-loss's masks with its windows; use --crop center with masks")
        _require(self.validation_every >= 0, f"--validation-every must be >= 0, got {self.validation_every}")
        _require(self.validation_inference_steps > 0,
                 f"--validation-inference-steps must be positive, got {self.validation_inference_steps}")
        _require(not self.validation_every or bool(self.validation_prompts),
                 "--validation-every needs at least one --validation-prompt")

    def _validate_pivotal(self) -> None:
        _require(self.embedding_lr is None or self.embedding_lr > 0,
                 f"--embedding-lr must be positive, got {self.embedding_lr}")
        _require(self.init_token is None or bool(self.init_token.strip()), "--init-token must not be empty")
        _require(not (self.pivotal and len(self.subjects) > 1 and not self.separate_adapters),
                 "--pivotal trains one identifier embedding per adapter: with several [[subjects]], add "
                 "--separate-adapters (one adapter and embedding each)")
        _require(self.optimizer != "prodigy" or all(v in (None, self.lr) for v in (self.text_encoder_lr,
                                                                                      self.embedding_lr)),
                 "--optimizer prodigy takes one lr for every parameter group (prodigyopt requires it): leave "
                 "--text-encoder-lr and --embedding-lr unset (or equal to --lr, normally 1.0)")
        prompts = self.class_prompt if isinstance(self.class_prompt, tuple) else ()
        _require(all(str(p).strip() for p in prompts), "--class-prompt must not be empty")

    def _validate_subjects(self) -> None:
        if not self.subjects:
            _require(not self.separate_adapters, "--separate-adapters needs a [[subjects]] list in the --config file")
            return
        first = self.subjects[0]
        for key in ("instance_dir", "token", "class_noun"):
            mine, theirs = getattr(self, key), getattr(first, key)
            _require(mine == theirs, f"{key} '{mine}' differs from the first [[subjects]] entry's '{theirs}'; "
                                     f"with [[subjects]], set it in the entries only")
        _require(self.class_dir is None, "class_dir: with [[subjects]], set class_dir inside each entry")
        tokens: dict[str, int] = {}
        labels: dict[str, int] = {}
        for i, subject in enumerate(self.subjects, 1):
            where = f"[[subjects]] entry {i}"
            token, noun = subject.token.strip(), subject.class_noun.strip()
            _require(token.lower() != noun.lower(), f"{where}: token '{token}' equals its class_noun")
            _require(token.lower() not in tokens,
                     f"{where}: token '{token}' is already used by entry {tokens.get(token.lower())}; "
                     f"every subject needs its own token")
            _require(subject.label not in labels, f"{where}: name '{subject.label}' is already used by entry "
                                                  f"{labels.get(subject.label)}")
            tokens[token.lower()] = i
            labels[subject.label] = i

    # -- derived values ---------------------------------------------------------------------------------------
    @property
    def effective_instance_prompt(self) -> str:
        """The instance prompt with `{token}`/`{class}` filled in."""
        template = self.instance_prompt or DEFAULT_INSTANCE_PROMPT
        return fill_prompt(template, self.token, self.class_noun)

    @property
    def effective_class_prompt(self) -> str:
        """The (first) class (prior) prompt with `{class}` filled in."""
        return self.effective_class_prompts[0]

    @property
    def effective_class_prompts(self) -> tuple[str, ...]:
        """Every class prompt with `{class}` filled in (the class images are split across them)."""
        return tuple(fill_prompt(t, self.token, self.class_noun) for t in class_prompt_templates(self.class_prompt))

    @property
    def effective_init_token(self) -> str:
        """The words whose embedding starts the --pivotal identifier (default: the class noun)."""
        return (self.init_token or self.class_noun).strip()

    def total_steps(self, num_instance_images: int) -> int:
        """`steps`, or the default of 100 per instance image capped at 1500."""
        if self.steps is not None:
            return self.steps
        return min(STEPS_PER_IMAGE * max(num_instance_images, 1), MAX_DEFAULT_STEPS)

    # -- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists, None values dropped: TOML has no null)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "subjects":
                value = tuple(s.to_dict() for s in value)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_toml(self) -> str:
        """The config as TOML text (what `--config` reads back)."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def to_json(self) -> str:
        """The config as compact JSON (stored in the adapter's safetensors metadata)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        data = mirror_first_subject(data)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"{source}: unknown option(s) {', '.join(unknown)}")
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise UserInputError(f"{source}: missing required option(s) {', '.join(missing)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # wrong value type reaching a comparison
            raise UserInputError(f"{source}: {exc}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _as_tuple(value: Any) -> tuple:
    """A list option as a tuple; a lone string (``export = "kohya"`` in TOML) is one item, not its letters."""
    return (value,) if isinstance(value, str) else tuple(value)


def _one_or_tuple(value: Any) -> str | tuple[str, ...] | None:
    """A repeatable option that stays a plain string when it holds one value (old configs and checkpoints compare
    equal), a tuple when it holds several, None when empty."""
    if value is None or isinstance(value, str):
        return value
    items = tuple(str(v) for v in value)
    return None if not items else items[0] if len(items) == 1 else items


def class_prompt_templates(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The class-prompt templates of a `class_prompt` value (the default when unset)."""
    if not value:
        return (DEFAULT_CLASS_PROMPT,)
    return (value,) if isinstance(value, str) else tuple(value)


def mirror_first_subject(data: Mapping[str, Any]) -> dict[str, Any]:
    """With `[[subjects]]`, the first entry supplies instance_dir, token and class_noun when they are left out."""
    out = dict(data)
    subjects = out.get("subjects")
    if subjects and isinstance(subjects, (list, tuple)):
        first = subjects[0]
        first = first.to_dict() if isinstance(first, SubjectConfig) else first
        if isinstance(first, Mapping):
            for key in ("instance_dir", "token", "class_noun"):
                if not out.get(key) and first.get(key):
                    out[key] = first[key]
    return out


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int | float, *, option: str = "size") -> int:
    """Bytes in "4GB", "3.5GiB", "1500M" or a plain number; GB and GiB both mean 2**30 here, as on GPU labels."""
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("BI").rstrip("KMGT") if raw else raw
    unit = raw[len(number):].rstrip("B").rstrip("I")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    _require(value > 0 and unit in _SIZE_UNITS, f"{option} must be a size such as 4GB, 3.5GiB or 1500MB; got '{text}'")
    return int(value * _SIZE_UNITS[unit])


def fill_prompt(template: str, token: str, class_noun: str) -> str:
    """Replace `{token}` and `{class}` placeholders (other braces are left alone)."""
    return template.replace("{token}", token).replace("{class}", class_noun)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"config file '{p}' does not exist")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"config file '{p}' is not valid TOML: {exc}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)
