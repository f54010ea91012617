"""Run our CLI in a torchrun rank with every rank on GPU 0 and gloo as the process group (tests and benchmarks).

NCCL refuses two ranks on one GPU; gloo all-reduces CUDA tensors. accelerate's PartialState is created first with
backend gloo (a process group made behind its back would leave it believing "nccl", and its gather would then call
all_gather_into_tensor, which gloo rejects); LOCAL_RANK=0 makes every rank use GPU 0 for its device, DDP's device
ids and barriers (accelerate takes all three from the local rank), as one rank per GPU would.
"""
import os
import sys

import torch

if __name__ == "__main__":
    os.environ["LOCAL_RANK"] = "0"
    torch.cuda.set_device(0)
    from accelerate import PartialState

    PartialState(backend="gloo")
    from lora_dreambooth.cli import main

    main(sys.argv[1:])
