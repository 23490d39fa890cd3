"""Import a script of ``benchmarks/`` (not a package) as a module, for its tests."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name`` (registered in ``sys.modules``: dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def read_back(root, in_chans: int, size: int, classes: int) -> None:
    """Read an image folder a builder wrote through deepmetric's ``image_folder`` format, half its
    classes to train: all ``classes`` are there, an image is ``(in_chans, size, size)``."""
    import numpy as np
    from deepmetric.config import load_config
    from deepmetric.engine.build import build_data

    cfg = load_config(None, ["data.format=image_folder", f"data.root={root}", "data.train_classes=0.5",
                             "data.transform=tensor", f"model.in_chans={in_chans}"])
    splits = build_data(cfg)
    assert splits.train.num_classes + len(np.unique(splits.query.labels)) == classes
    image, _, _ = splits.query[0]
    assert tuple(image.shape) == (in_chans, size, size)
