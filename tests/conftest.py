"""Tests use small models: one intra-op thread is faster for them and keeps a shared machine usable."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses some tests start
torch.set_num_threads(1)
