"""What one Synthetic DreamBench run is (its settings) and what it produced (its numbers)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lora_dreambooth.synthetic.measure import PromptStats, SamplerConfig, effects
from lora_dreambooth.synthetic.pretrain import PretrainConfig

#: UNet layers the benchmark's adapters train: the attention projections (the trainer's default) plus the
#: resnet convolutions and the transformer in/out projections ("LoCon"). In a UNet this small, attention-only LoRA
#: shifted colours but could not draw the subject (measured: subject drawn 0-3 % of the time at rank 4-16).
ATTENTION_AND_CONVS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the base, the subject, the two trainings and the measurement budget."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    token: str = "sks"
    class_noun: str = "triangle"
    subject_photos: int = 5
    subject_size: float = 0.55  # fraction of the picture (class-world shapes are 0.34-0.46)
    steps: int = 1000
    rank: int = 4
    lr: float = 2e-3
    text_encoder_lr: float | None = None  # None: = lr
    train_text_encoder: bool = True
    unet_targets: tuple[str, ...] | None = ATTENTION_AND_CONVS  # None: the trainer's default (attention only)
    prior_weight: float = 1.0
    num_class_images: int = 50
    class_inference_steps: int = 20
    samples: int = 32  # pictures per prompt family
    edit_colors: tuple[str, ...] = ("blue", "red", "yellow")
    world_repeats: int = 2  # pictures per "a photo of a {colour} {shape}" prompt
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"


#: The CI variant: the same base (the package ships it), fewer training steps, class images and pictures.
#: 420 steps (not 600): a third less training for tests/test_synthetic.py, with every effect it asserts still clear
#: (measured, seed 0: subject similarity base 0.11 / prior 0.27 / no prior 0.42, subject drawn 0 / 0 / 19 %,
#: the no-prior adapter's drift +0.25 in similarity and +25 points in leak over the prior adapter's).
CI_CONFIG = BenchConfig(steps=420, num_class_images=16, class_inference_steps=10, samples=16, world_repeats=1,
                        sampler=SamplerConfig(inference_steps=12))


@dataclass
class BenchResult:
    """Every measured number (``stats[model][family]``), timings in seconds, and the files written."""

    stats: dict[str, dict[str, PromptStats]]
    seconds: dict[str, float]
    base_dir: Path
    files: dict[str, Path] = field(default_factory=dict)

    def to_json(self, cfg: BenchConfig) -> dict:
        """Plain-JSON form: config, timings, and every statistic."""
        return {
            "config": asdict(cfg),
            "base": str(self.base_dir),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "stats": {m: {f: s.as_dict() for f, s in fam.items()} for m, fam in self.stats.items()},
            "effects": effects(self.stats),
        }


def with_overrides(cfg: BenchConfig, **changes) -> BenchConfig:
    """``cfg`` with top-level fields replaced (``None`` values ignored)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
