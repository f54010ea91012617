"""Run our CLI in a torchrun rank with every rank on GPU 0 and gloo as the process group (tests and benchmarks).

NCCL refuses two ranks on one GPU; gloo all-reduces CUDA tensors. accelerate keeps a process group that already
exists, and with ACCELERATE_BYPASS_DEVICE_MAP=true wraps DDP without device ids (every rank's module is on GPU 0).
"""
import os
import sys

import torch
import torch.distributed as dist

if __name__ == "__main__":
    os.environ.setdefault("ACCELERATE_BYPASS_DEVICE_MAP", "true")
    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    from lora_dreambooth.cli import main

    main(sys.argv[1:])
