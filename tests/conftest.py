"""Shared fixtures. Everything is generated; nothing is downloaded."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A digits recipe small enough for a CPU test: 5 classes x 4 images, a few steps.
TINY = ["data.classes_per_batch=5", "data.samples_per_class=4", "model.embedding_dim=16",
        "model.backbone_options={width: 16}", "train.log_every=1", "train.progress=false"]


@pytest.fixture
def tiny_overrides():
    return list(TINY)
