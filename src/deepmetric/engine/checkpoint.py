"""Checkpoints: a directory per checkpoint, written whole and swapped in atomically.

Layout of ``RUN_DIR/checkpoints/{last,best}/``:

- ``model.safetensors``: the Embedder's weights (all that inference, export and search need);
- ``train_state.safetensors``: loss-module tensors (classifier weights, cross-batch memory),
  optimizer tensors and the torch RNG state;
- ``state.json``: step, epoch and position in the epoch, optimizer structure, scheduler, sampler,
  numpy/python RNG states, the metrics at that step;
- ``config.yaml``: the resolved recipe, so a checkpoint describes itself.

A checkpoint is written into a temporary sibling directory and renamed into place; the previous one
is moved aside first and deleted last, so a crash leaves either the old or the new checkpoint whole
(``load`` falls back to the moved-aside copy). ``state.json`` is written last: a directory without it
is never treated as a checkpoint.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import Config, load_config, save_config
from ..errors import UserError

STATE = "state.json"


class CheckpointError(UserError):
    """A missing or unusable checkpoint; the message names the path."""


def _flatten_optimizer(opt_state: Dict[str, Any], prefix: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, entry in opt_state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().cpu().contiguous()
                meta["state"][str(pid)][key] = {"tensor": f"{prefix}.{pid}.{key}"}
            else:
                meta["state"][str(pid)][key] = {"value": value}
    return tensors, meta


def _unflatten_optimizer(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]})


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    if "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    if "python" in meta:
        p = meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def _state_tensors(module: torch.nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(directory: str | Path, *, cfg: Config, model: torch.nn.Module,
                    losses: torch.nn.ModuleList, optimizers: Dict[str, torch.optim.Optimizer],
                    state: Dict[str, Any]) -> Path:
    """Write a complete checkpoint to ``directory`` atomically (see module docstring)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        save_file(_state_tensors(model, ""), str(tmp / "model.safetensors"))
        tensors = _state_tensors(losses, "losses.")
        opt_meta = {}
        for name, opt in optimizers.items():
            t, m = _flatten_optimizer(opt.state_dict(), f"optim.{name}")
            tensors.update(t)
            opt_meta[name] = m
        rt, rmeta = rng_state()
        tensors.update(rt)
        save_file(tensors, str(tmp / "train_state.safetensors"))
        save_config(cfg, tmp / "config.yaml")
        full = dict(state, optimizers=opt_meta, rng=rmeta, format=1)
        (tmp / STATE).write_text(json.dumps(full, indent=1))
        old = directory.parent / f".{directory.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a run directory (``best``, else ``last``) or a checkpoint path."""
    p = Path(path)
    candidates = [p]
    if (p / "checkpoints").is_dir():
        order = (prefer, "last") if prefer != "last" else ("last",)
        candidates = [p / "checkpoints" / name for name in order]
    for c in candidates:
        if (c / STATE).is_file():
            return c
        old = c.parent / f".{c.name}.old"  # crash between the two renames of save_checkpoint
        if (old / STATE).is_file():
            return old
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(f"no complete checkpoint in {p} (expected {STATE} and model.safetensors)")


def read_checkpoint(path: str | Path, prefer: str = "best") -> Tuple[Path, Dict[str, Any]]:
    ckpt = resolve_checkpoint(path, prefer)
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE}: unreadable ({e})") from None
    return ckpt, state


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{f} does not fit the model of its config.yaml "
                              f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def load_train_state(ckpt: Path, losses: torch.nn.ModuleList,
                     optimizers: Dict[str, torch.optim.Optimizer], meta: Dict[str, Any]) -> None:
    f = ckpt / "train_state.safetensors"
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    loss_state = {k[len("losses."):]: v for k, v in tensors.items() if k.startswith("losses.")}
    losses.load_state_dict(loss_state, strict=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(_unflatten_optimizer(meta["optimizers"][name], tensors))
    set_rng_state(tensors, meta.get("rng", {}))


def load_for_inference(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu"):
    """``(model, cfg, ckpt_dir)`` from a run directory or checkpoint directory, in eval mode."""
    from .build import build_model

    ckpt, _ = read_checkpoint(path, prefer)
    cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg, load_weights=False)
    load_model_weights(model, ckpt)
    return model.to(device).eval(), cfg, ckpt
