"""A tiny real checkpoint (small CNN, 16-d, ImageNet preprocessing at 32x32) and an image folder,
built once per session. ``tests/serve/conftest.py`` carries a copy of the checkpoint fixture."""
from __future__ import annotations

import pytest
import torch

from deepmetric.config import load_config
from deepmetric.data.synthetic import make_image_folder
from deepmetric.engine.build import build_model
from deepmetric.engine.checkpoint import save_checkpoint

TINY = ["model.backbone=small_cnn", "model.in_chans=3", "model.embedding_dim=16",
        "data.transform=imagenet", "data.image_size=[32,32]"]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode export is really tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", cfg=cfg, model=model,
                           losses=torch.nn.ModuleList(), optimizers={}, state={"step": 0})


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "gallery", n_classes=4, per_class=5, size=40)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny workloads on 2 shared cores: OpenMP/intra-op threads only add spin-wait contention.
    Restored after each module, so other test directories keep their settings."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
