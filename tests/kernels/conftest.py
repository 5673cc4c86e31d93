"""Without CUDA, run the Triton kernels in Triton's interpreter.

Triton decides between compiling and interpreting when a kernel is defined, so this must run
before any module defining kernels under test is imported; pytest loads this file first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
