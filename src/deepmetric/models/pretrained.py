"""Which backbone a weights file is for, and the weights torch and timm have already downloaded.

``deepmetric train my_images/`` uses a pretrained backbone when there is one: a file given as
``model.pretrained=PATH``, or one found in the caches torchvision and timm download into
(:func:`cached_weights`). :func:`identify_weights` reads a state dict and names the catalogued
backbone it loads into, with the input size it was trained at:

- torchvision / timm ResNets (``conv1.weight``, ``layer4.*``): the depth from the blocks of
  ``layer3`` (2: ResNet-18, 6: 34 or 50 by block type, 23: 101), at 224 x 224;
- a file in timm's Hugging Face cache (``models--timm--<name>/snapshots/*/``): ``timm:<name>`` at
  the ``input_size`` of its ``config.json``.

Nothing is downloaded; a file that fits no backbone is named in a one-line error.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..core.errors import UserError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class KnownWeights:
    """A weights file and what it is: ``backbone`` (a catalogue name such as ``resnet50`` or
    ``timm:convnext_tiny``) and the ``input_size`` ``(H, W)`` it was trained at."""

    path: str
    backbone: str
    input_size: Tuple[int, int]


def cache_dirs() -> List[Path]:
    """Where torchvision (``$TORCH_HOME/hub/checkpoints``) and timm (``$HF_HOME/hub``) keep downloads."""
    torch_home = Path(os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch")
    hf_home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub")
    return [torch_home / "hub" / "checkpoints", hub]


def cached_weights() -> List[KnownWeights]:
    """The weights files in the caches (:func:`cache_dirs`) that a catalogued backbone loads, in a
    stable order (torchvision's first, then timm's, each by name)."""
    found: List[KnownWeights] = []
    torch_dir, hub = cache_dirs()
    if torch_dir.is_dir():
        for path in sorted(torch_dir.iterdir()):
            if path.suffix in WEIGHT_SUFFIXES:
                known = _quietly(path)
                if known is not None:
                    found.append(known)
    if hub.is_dir():
        for repo in sorted(hub.glob("models--timm--*")):
            for path in sorted(repo.glob("snapshots/*/*")):
                if path.suffix in WEIGHT_SUFFIXES:
                    known = _quietly(path)
                    if known is not None:
                        found.append(known)
                        break
    return found


def _quietly(path: Path) -> Optional[KnownWeights]:
    try:
        return identify_weights(path)
    except UserError:
        return None


def identify_weights(path: str | os.PathLike) -> KnownWeights:
    """The backbone a weights file is for (see the module docstring).

    Raises:
        UserError: unreadable, or no catalogued backbone matches; one line naming the file.
    """
    from .embedder import read_state_dict

    path = Path(path)
    timm_name, size = _timm_repo(path)
    if timm_name is not None:
        return KnownWeights(str(path), f"timm:{timm_name}", size)
    state = read_state_dict(path)
    depth = _resnet_depth(state)
    if depth is not None:
        return KnownWeights(str(path), f"resnet{depth}", (224, 224))
    raise UserError(f"model.pretrained={path}: cannot tell which backbone these weights are for (first keys: "
                    f"{', '.join(list(state)[:3])}); name it with model.backbone (e.g. resnet50, or timm:<name>) "
                    f"and data.image_size")


def _resnet_depth(state) -> Optional[int]:
    if "conv1.weight" not in state or not any(k.startswith("layer4.") for k in state):
        return None
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"layer3\.(\d+)\.", k)] if m}
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
    n = len(blocks)
    table = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}
    return table.get((n, bottleneck))


def _timm_repo(path: Path) -> Tuple[Optional[str], Tuple[int, int]]:
    """``(model name, input size)`` for a file inside timm's Hugging Face cache, else ``(None, ...)``."""
    for parent in path.parents:
        m = re.match(r"models--timm--(.+)$", parent.name)
        if m:
            name = m.group(1).split(".")[0]  # resnet50.a1_in1k -> resnet50
            size = (224, 224)
            config = path.parent / "config.json"
            try:
                cfg = json.loads(config.read_text())
                name = cfg.get("architecture", name)
                shape = (cfg.get("pretrained_cfg") or {}).get("input_size") or cfg.get("input_size")
                if shape and len(shape) == 3:
                    size = (int(shape[1]), int(shape[2]))
            except (OSError, ValueError):
                pass
            return name, size
    return None, (224, 224)
