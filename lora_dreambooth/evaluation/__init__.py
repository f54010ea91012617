# ruff: noqa: F401  (the package namespace re-exports the stages' public names)
"""DreamBench-style evaluation: generate the benchmark prompts, score DINO / CLIP-I / CLIP-T, write a report.

The metrics follow Ruiz et al., "DreamBooth", CVPR 2023 (Sec. 4.1, Table 1):

- DINO: mean cosine similarity between the ViT-S/16 DINO [CLS] embeddings of every (generated, real) pair;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity between each generated image and the CLIP embedding of its prompt.

The paper does not spell out the CLIP-T text; like the common reproductions we drop the rare token, so
"a sks dog in the jungle" is scored against "a dog in the jungle" (the token means nothing to CLIP).
The paper's "real images" row is reproduced by ``real_baseline``: the same similarities between distinct
real photos (i != j; a photo against itself would add a trivial 1.0).

Stages, one module each: ``prompts`` -> ``generate`` (images with and without the adapter) -> ``embedders``
(CLIP, DINO) -> ``metrics`` / ``scoring`` -> ``report``; ``run`` ties them together for the CLI. Everything
but ``run`` is independent of how adapters are loaded: :func:`evaluate` takes a diffusers pipeline that already
holds the adapter and, for ``compare_base``, switches it off with ``pipe.disable_lora()`` / ``pipe.enable_lora()``.
"""
from lora_dreambooth.evaluation.embedders import (DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, ClipEmbedder, DinoEmbedder,
                                                  MetricModels, hub_reachable, load_metric_models)
from lora_dreambooth.evaluation.generate import adapters_disabled, generate_for_evaluation
from lora_dreambooth.evaluation.images import GeneratedImage, list_images, load_images, read_manifest
from lora_dreambooth.evaluation.metrics import (cosine_matrix, l2_normalize, mean_distinct_pair_cosine,
                                                mean_pairwise_cosine, paired_cosine)
from lora_dreambooth.evaluation.prompts import (KINDS, EvalPrompt, dreambench_prompts, load_prompt_templates,
                                                read_prompt_file, remove_token)
from lora_dreambooth.evaluation.report import format_summary, write_report
from lora_dreambooth.evaluation.run import evaluate, evaluate_adapter
from lora_dreambooth.evaluation.scoring import score_images
from lora_dreambooth.evaluation.tiny_models import save_tiny_metric_models

__all__ = [name for name in dir() if not name.startswith("_")]
