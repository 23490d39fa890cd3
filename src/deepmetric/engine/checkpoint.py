"""Checkpoints: a directory per checkpoint, written whole and swapped in atomically.

Layout of ``RUN_DIR/checkpoints/{last,best}/``:

- ``model.safetensors``: the Embedder's weights (all that inference, export and search need; under
  ``train.ema`` their moving average, the weights the run evaluated);
- ``train_state.safetensors``: loss-module tensors (classifier weights, cross-batch memory),
  optimizer tensors, the torch RNG state and the tensors of the run's hooks (under ``train.ema``
  the live weights, ``live.*``: :mod:`.hooks`);
- ``state.json``: step, epoch and position in the epoch, optimizer structure, scheduler, sampler,
  numpy/python RNG states, the metrics at that step;
- ``config.yaml``: the resolved recipe, so a checkpoint describes itself.

Crash safety. A save of ``NAME`` writes a new sibling ``.NAME.tmp-XXXXXXXX``: every file is fsynced,
``state.json`` last, then the folder and its parent; only then is the previous ``NAME`` renamed to
``.NAME.old``, the new folder renamed to ``NAME`` and the parent fsynced again. Once the new one is
in place the stale ``.NAME.old`` and ``.NAME.tmp-*`` folders are removed, ``state.json`` first.

A folder with a readable ``state.json`` (a JSON object) and ``model.safetensors`` is *complete*;
``state.json`` being written last, a kill at any point of any number of saves in a row leaves at
least one complete folder among ``NAME``, ``.NAME.old`` and the ``.NAME.tmp-*``, and
:func:`read_checkpoint` takes the newest of them by ``step`` (``NAME`` on a tie). Resolving only
reads: it never moves a folder another process may be writing.

Loading (:func:`load_into`, the one path for the model's weights, the losses' tensors and a hook's)
refuses, as a one-line :class:`CheckpointError`, weights of another shape than the module (naming
the tensor, its shape in the file and in the module), NaN or infinite weights, and a ``state.json``
without what resuming needs. New folders and files get the permissions of anything
the user creates (``0o777`` / ``0o666`` less the umask).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save

from ..config import Config
from ..core.errors import UserError
from ..core.files import fsync_dir, write_new_file
from ..models import WeightsError, first_nonfinite, read_state_dict, weight_mismatches

STATE = "state.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.safetensors"
CONFIG = "config.yaml"
#: what resuming reads from ``state.json`` (the trainer writes them all)
RESUME_KEYS = ("step", "epoch", "position", "scheduler", "loader_generator", "optimizers")
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when built in: the same text, faster

log = logging.getLogger("deepmetric")


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


# -- filesystem steps ---------------------------------------------------------------------------
# Every change a save makes to the disk goes through one of these, so that tests can stop the world
# at each of them in turn (a kill -9 there) and check that a complete checkpoint survives.

def _make_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # less the umask, like any folder the user makes (mkdtemp: 0700)


_write_file = write_new_file  # 0o666 less the umask, fsynced
_fsync_dir = fsync_dir


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _unlink(path: Path) -> None:
    os.unlink(path)


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint folder, ``state.json`` first: from its first step on it is no longer complete."""
    for entry in sorted(path.iterdir(), key=lambda e: e.name != STATE):
        if entry.is_dir() and not entry.is_symlink():
            _remove_dir(entry)
        else:
            _unlink(entry)
    _rmdir(path)


# -- saving --------------------------------------------------------------------------------------

def _serialise(cfg: Config, model: torch.nn.Module, losses: torch.nn.ModuleList,
               optimizers: Dict[str, torch.optim.Optimizer], state: Dict[str, Any],
               extra: Dict[str, torch.Tensor]) -> Dict[str, bytes]:
    """The checkpoint's files as bytes, ``state.json`` last (the order they are written in)."""
    tensors = _state_tensors(losses, "losses.")
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
    opt_meta = {}
    for name, opt in optimizers.items():
        t, m = _flatten_optimizer(opt.state_dict(), f"optim.{name}")
        tensors.update(t)
        opt_meta[name] = m
    rt, rmeta = rng_state()
    tensors.update(rt)
    full = dict(state, optimizers=opt_meta, rng=rmeta, format=1)
    return {WEIGHTS: save(_state_tensors(model, "")), TRAIN_STATE: save(tensors),
            CONFIG: yaml.dump(cfg.to_dict(), Dumper=_YAML_DUMPER, sort_keys=False).encode(),
            STATE: json.dumps(full, indent=1).encode()}


def _old(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def _siblings(final: Path) -> List[Path]:
    """``.NAME.old`` and the ``.NAME.tmp-*`` folders: where interrupted saves of ``NAME`` leave theirs."""
    if not final.parent.is_dir():
        return []
    tmps = sorted(final.parent.glob(f".{glob.escape(final.name)}.tmp-*"))
    return [p for p in (_old(final), *tmps) if p.is_dir()]


def save_checkpoint(directory: str | Path, *, cfg: Config, model: torch.nn.Module,
                    losses: torch.nn.ModuleList, optimizers: Dict[str, torch.optim.Optimizer],
                    state: Dict[str, Any], extra: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write a complete checkpoint to ``directory`` atomically (see module docstring). ``extra``:
    tensors of the run's hooks, kept in ``train_state.safetensors`` under their own prefixes."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    files = _serialise(cfg, model, losses, optimizers, state, extra or {})
    tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
    _make_dir(tmp)
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        _fsync_dir(directory.parent)
    except Exception:  # an error (disk full), not a kill: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # from here on tmp is complete and the newest: every step below leaves a checkpoint to resume from
    old = _old(directory)
    if old.exists():
        _remove_dir(old)
    if directory.exists():
        _rename(directory, old)
    _rename(tmp, directory)
    _fsync_dir(directory.parent)
    for stale in _siblings(directory):
        try:
            _remove_dir(stale)
        except OSError as e:  # the new checkpoint is in place: a leftover that stays is only said
            log.warning("could not remove the stale %s (%s); it is ignored while %s is newer", stale, e, directory)
    return directory


# -- finding -------------------------------------------------------------------------------------

def _complete_state(folder: Path) -> Optional[Dict[str, Any]]:
    """The ``state.json`` of a complete checkpoint folder, else ``None``."""
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and (folder / WEIGHTS).is_file() else None


def _step(state: Dict[str, Any]) -> int:
    step = state.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


def newest_complete(final: str | Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(folder, state)`` of the newest complete checkpoint among ``final``, ``.NAME.old`` and
    ``.NAME.tmp-*`` (highest ``step``; ``final`` on a tie), or ``None``."""
    final = Path(final)
    found = []
    for order, folder in enumerate([final, *_siblings(final)]):
        state = _complete_state(folder)
        if state is not None:
            found.append((_step(state), -order, folder, state))
    if not found:
        return None
    *_, folder, state = max(found, key=lambda f: f[:2])
    return folder, state


def _why_incomplete(folder: Path) -> Optional[str]:
    f = folder / STATE
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        return f"{f}: unreadable ({type(e).__name__}: {e})".splitlines()[0]
    if not isinstance(state, dict):
        return f"{f}: expected a JSON object, got {type(state).__name__}"
    return f"{folder}: {WEIGHTS} is missing"


def read_checkpoint(path: str | Path, prefer: str = "best") -> Tuple[Path, Dict[str, Any]]:
    """``(checkpoint folder, state.json)`` from a run directory (its newest complete ``prefer``
    checkpoint, else ``last``) or a checkpoint folder (see module docstring)."""
    p = Path(path)
    finals = [p]
    if (p / "checkpoints").is_dir():
        finals = [p / "checkpoints" / name for name in dict.fromkeys((prefer, "last"))]
    for final in finals:
        hit = newest_complete(final)
        if hit is not None:
            return hit
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    for final in finals:
        why = _why_incomplete(final)
        if why:
            raise CheckpointError(why)
    raise CheckpointError(f"no complete checkpoint in {p} (expected {STATE} and {WEIGHTS})")


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a run directory (``best``, else ``last``) or a checkpoint path."""
    return read_checkpoint(path, prefer)[0]


# -- loading -------------------------------------------------------------------------------------

def load_into(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str, *, prefix: str = "",
              mismatch: Callable[[str, str], str] = lambda first, count: f"another architecture ({first}; {count})",
              nan_fix: str = "resume from an earlier checkpoint") -> None:
    """The one load path: the tensors of ``tensors`` under ``prefix`` into ``module``, after refusing
    NaN or infinite values and any tensor of another name or shape than the module's, as one line
    naming ``source`` and the first tensor (``mismatch(first difference, "N differences")`` words
    it). Only ``num_batches_tracked`` may be absent."""
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    bad = first_nonfinite(own)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor {prefix}{bad[0]} holds {bad[1]} NaN/infinite values (saved after "
                              f"the run diverged?); {nan_fix}")
    problems = weight_mismatches(module.state_dict(), own)
    if problems:
        raise CheckpointError(mismatch(problems[0], f"{len(problems)} difference{'s' if len(problems) > 1 else ''}"))
    module.load_state_dict(own, strict=False)


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load ``ckpt/model.safetensors`` into ``model``; refuses another architecture (naming the first
    tensor that differs, with both shapes) and NaN or infinite weights, before changing anything."""
    f = Path(ckpt) / WEIGHTS
    try:
        tensors = read_state_dict(f)  # refuses NaN or infinite weights, naming the tensor
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    load_into(model, tensors, str(f), mismatch=lambda first, count: (
        f"{f} holds another architecture than the model it is loaded into: {first} ({count}); load it with "
        f"the model of its own {Path(ckpt) / CONFIG}"))


def load_train_state(ckpt: Path, losses: torch.nn.ModuleList,
                     optimizers: Dict[str, torch.optim.Optimizer], meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Restore loss modules, optimizers and RNGs for resuming; ``meta`` is the checkpoint's
    ``state.json``. Returns the train state's other tensors (the hooks', :func:`load_into` them)."""
    missing = [k for k in RESUME_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{Path(ckpt) / STATE} lacks {', '.join(missing)}: not a training checkpoint "
                              "(or a damaged one); resume from another run, or train afresh")
    f = Path(ckpt) / TRAIN_STATE
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    load_into(losses, tensors, str(f), prefix="losses.", mismatch=lambda first, count: (
        f"{f}: the loss terms differ from this recipe's losses ({first}); resume with the losses of "
        f"{Path(ckpt) / CONFIG}, or train afresh"))
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(_unflatten_optimizer(meta["optimizers"][name], tensors))
        except (KeyError, ValueError) as e:  # another set of parameters or optimizers
            raise CheckpointError(f"{Path(ckpt) / STATE}: optimizer {name!r} does not fit this recipe's "
                                  f"({type(e).__name__}: {e}); resume with {Path(ckpt) / CONFIG}".splitlines()[0]) from None
    set_rng_state(tensors, meta.get("rng", {}))
    return {k: v for k, v in tensors.items() if not k.startswith(("losses.", "optim.", "rng."))}
