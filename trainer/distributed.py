"""Process-group setup shared by every launcher of the training loop (Ray Train, torchrun,
a plain process)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist


def import_deepspeed() -> Any:
    import deepspeed

    if not torch.cuda.is_available():
        # The CPU backend JIT-builds a shared-memory op (used only by inference all-reduce)
        # at init: 80-155 s of C++ compilation we do not need.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def init_distributed() -> None:
    """Join the launcher's process group, or create a one-process one. The group lives as
    long as the process: DeepSpeed caches groups, so it must not be destroyed and remade."""
    deepspeed = import_deepspeed()
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
