"""Low-level compute kernels the models run through (no package imports: any stage may use them)."""
import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)  # the 16-bit compute dtypes
