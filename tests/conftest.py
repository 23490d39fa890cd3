"""Shared fixtures. Everything is generated; nothing is downloaded."""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deepmetric.config import load_config
from deepmetric.data.synthetic import make_image_folder
from deepmetric.engine.build import build_model
from deepmetric.engine.checkpoint import save_checkpoint

# A digits recipe small enough for a CPU test (the quickstart recipe's training loop on digits 0-4, unseen
# 5-9 queried, no validation split): 5 classes x 4 images, a few steps.
TINY = ["data.format=digits", "data.options={}", "data.train_classes=[0,1,2,3,4]", "data.val_classes=null",
        "data.transform=tensor", "data.image_size=null", "data.eval_batch_size=256",
        "losses=[{name: triplet, params: {mining: hard, margin: 0.2}}]", "eval.metric=recall@1",
        "data.classes_per_batch=5", "data.samples_per_class=4", "model.embedding_dim=16",
        "model.backbone_options={width: 16}", "train.log_every=1", "train.progress=false"]
# A tiny RGB model for the shipping tests: small CNN, 16-d, ImageNet preprocessing at 32x32.
TINY_RGB = ["model.backbone=small_cnn", "model.in_chans=3", "model.embedding_dim=16",
            "data.transform=imagenet", "data.image_size=[32,32]"]


def require(condition: bool, reason: str) -> None:
    """Skip the calling test (or module) with ``reason`` unless ``condition`` holds; under ``CI=true``
    fail instead. For what ``make test`` or ``.ci/run`` installs (the dev extra's oracles, Debian's
    Fashion-MNIST, chromium, the CJK fonts): there, its absence is a broken install, and a skip would
    silently drop the claims the test checks. What CI does not install (a GPU) keeps ``pytest.skip``."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: make test or .ci/run installs it, so it must be there)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str = ""):
    """``import name``, or :func:`require` fails/skips naming the module and ``reason`` (how to install it)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"cannot import {name} ({e}){': ' + reason if reason else ''}")


# Prepended to a subprocess's code: importing PyTorch (or torchvision, timm) fails as if not installed.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, BlockTorch())
""")


@pytest.fixture
def run_python():
    """``run_python(code, block_torch=False)``: run ``code`` (dedented) in a fresh interpreter and return
    the ``CompletedProcess`` (text output captured); with ``block_torch``, PyTorch cannot be imported."""
    def run(code: str, block_torch: bool = False) -> subprocess.CompletedProcess:
        source = (BLOCK_TORCH if block_torch else "") + textwrap.dedent(code)
        return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120)
    return run


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """A real checkpoint directory of a tiny RGB model, with non-trivial BatchNorm statistics so that
    eval-mode behaviour (export, serving) is really exercised."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY_RGB)
    model = build_model(cfg)
    with torch.no_grad():
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
    """Tiny workloads on 2 shared cores: extra intra-op/OpenMP threads only spin. Restored per module."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
