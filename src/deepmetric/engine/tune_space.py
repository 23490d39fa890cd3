"""What ``deepmetric tune`` searches: :data:`SPACE`, a table of :class:`Dimension` s, and the recipe a
trial's choices make.

Each row names an Optuna parameter, the recipe key it sets, its range (or choices) and when it applies
(a recipe key and the values it must hold, read on the recipe as the rows before it left it: the loss
parameters follow the loss family chosen above them). :func:`trial_recipe` walks the table in order.

The base recipe (the automatic recipe, or yours) is always a point of the space: :func:`space_for`
widens a range, or adds a choice, to hold the base's value, and :func:`base_choices` reads that value
(a loss parameter the recipe leaves out is its constructor's default), so trial 0, the default, is the
base recipe itself and Optuna learns from it like any other trial.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ..losses import LOSSES

#: the loss families searched (every one a pair loss, so each can take a cross-batch memory)
LOSS_FAMILIES = ("multi_similarity", "triplet", "circle", "contrastive", "supcon")

_MISSING = object()


def _same(choice: Any, current: Any) -> Any:
    return choice


def _loss_term(family: str, term: Dict[str, Any]) -> Dict[str, Any]:
    """Loss term 0 for ``family``: the base's own term when it is that family (its other parameters
    kept), else a fresh term of that family (the base's weight and input kept)."""
    if term.get("name") == family:
        return term
    return {**{k: term[k] for k in ("weight", "input") if k in term}, "name": family, "params": {}}


def _memory(size: int, memory: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``losses.0.memory`` for a size (0: no memory); the base memory's start and weight kept."""
    return None if not size else {**(memory or {}), "size": int(size)}


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: Optuna's ``name``, the recipe ``key`` it sets, a range ``low`` ..
    ``high`` (``log``: log-uniform; ``relative``: factors of the base recipe's value) or ``choices``,
    and ``when`` it applies: ``(key, values)``, the recipe's ``key`` holding one of ``values``.
    ``to_recipe(choice, value now at key)`` is the value written; ``from_recipe`` reads a choice back."""

    name: str
    key: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Tuple[Any, ...] = ()
    relative: bool = False
    when: Optional[Tuple[str, Tuple[Any, ...]]] = None
    to_recipe: Callable[[Any, Any], Any] = _same
    from_recipe: Callable[[Any], Any] = lambda value: value

    def applies(self, raw: Dict[str, Any]) -> bool:
        return self.when is None or get_key(raw, self.when[0], None) in self.when[1]

    def suggest(self, trial: Any) -> Any:
        """This dimension's value for an Optuna ``trial`` (``suggest_categorical`` / ``suggest_float``)."""
        if self.choices:
            return trial.suggest_categorical(self.name, self.choices)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        span = (" | ".join(map(str, self.choices)) if self.choices else
                f"{self.low:g} .. {self.high:g}{' x the base' if self.relative else ''}{' (log)' if self.log else ''}")
        when = f"  when {self.when[0]} in {{{', '.join(map(str, self.when[1]))}}}" if self.when else ""
        return f"{self.name:<24} {self.key:<32} {span}{when}"


def _family(*names: str) -> Tuple[str, Tuple[str, ...]]:
    return ("losses.0.name", names)


#: The search space, in the order a trial is built (docs/tune.md shows it as a table).
SPACE: Tuple[Dimension, ...] = (
    Dimension("loss", "losses.0", choices=LOSS_FAMILIES, to_recipe=_loss_term, from_recipe=lambda t: t["name"]),
    Dimension("ms_alpha", "losses.0.params.alpha", 0.5, 10.0, log=True, when=_family("multi_similarity")),
    Dimension("ms_beta", "losses.0.params.beta", 10.0, 100.0, log=True, when=_family("multi_similarity")),
    Dimension("ms_base", "losses.0.params.base", 0.3, 0.8, when=_family("multi_similarity")),
    Dimension("ms_miner_epsilon", "losses.0.params.miner_epsilon", 0.0, 0.3, when=_family("multi_similarity")),
    Dimension("triplet_margin", "losses.0.params.margin", 0.01, 0.5, log=True, when=_family("triplet")),
    Dimension("triplet_mining", "losses.0.params.mining", choices=("all", "hard", "semihard"), when=_family("triplet")),
    Dimension("circle_m", "losses.0.params.m", 0.1, 0.5, when=_family("circle")),
    Dimension("circle_gamma", "losses.0.params.gamma", 16.0, 256.0, log=True, when=_family("circle")),
    Dimension("contrastive_pos_margin", "losses.0.params.pos_margin", 0.0, 0.5, when=_family("contrastive")),
    Dimension("contrastive_neg_margin", "losses.0.params.neg_margin", 0.5, 1.5, when=_family("contrastive")),
    Dimension("supcon_temperature", "losses.0.params.temperature", 0.03, 0.5, log=True, when=_family("supcon")),
    Dimension("memory", "losses.0.memory", choices=(0, 1024, 4096, 16384), when=_family(*LOSS_FAMILIES),
              to_recipe=_memory, from_recipe=lambda m: 0 if m is None else int(m["size"])),
    Dimension("lr", "optimizer.lr", 0.1, 10.0, log=True, relative=True),
    Dimension("augmentation", "data.transform", choices=("tensor", "tensor_augment"),
              when=("data.transform", ("tensor", "tensor_augment"))),
    Dimension("crop_augmentation", "data.transform", choices=("xbm", "imagenet"),
              when=("data.transform", ("xbm", "imagenet"))),
    Dimension("embedding_dim", "model.embedding_dim", choices=(64, 128, 256, 512)),
    Dimension("width", "model.backbone_options.width", choices=(16, 32, 48, 64), when=("model.backbone", ("small_cnn",))),
)


# -- recipe keys in a nested dict ----------------------------------------------------------------------

def get_key(raw: Any, key: str, default: Any = _MISSING) -> Any:
    """The value at ``a.b.0.c`` of a recipe dict (``default`` where a part is missing)."""
    node = raw
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            if default is _MISSING:
                raise KeyError(key)
            return default
    return node


def set_key(raw: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a recipe dict in place (missing or null sections become dicts)."""
    *parts, last = key.split(".")
    node: Any = raw
    for part in parts:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# -- the space around a base recipe ------------------------------------------------------------------

def with_loss_defaults(raw: Dict[str, Any]) -> Dict[str, Any]:
    """``raw`` with loss term 0's parameters completed from its constructor's defaults, so each
    parameter the recipe leaves out reads as the value the loss uses."""
    out = copy.deepcopy(raw)
    term = out["losses"][0]
    try:
        signature = inspect.signature(LOSSES.get(term["name"]))
    except (KeyError, TypeError, ValueError):
        return out
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not p.empty}
    term["params"] = {**defaults, **(term.get("params") or {})}
    return out


def base_choices(space: Sequence[Dimension], base: Dict[str, Any]) -> Dict[str, Any]:
    """The choice of each dimension that applies to recipe ``base`` (a dict), read from it; a value the
    dimension cannot hold (no miner at all, where the space has a miner margin) is left out."""
    raw = with_loss_defaults(base)
    out: Dict[str, Any] = {}
    for dim in space:
        if not dim.applies(raw):
            continue
        choice = dim.from_recipe(get_key(raw, dim.key, None))
        if isinstance(choice, bool) or not isinstance(choice, (int, float, str)):
            continue
        if not dim.choices and (not isinstance(choice, (int, float)) or (dim.log and choice <= 0)):
            continue
        out[dim.name] = choice
    return out


def space_for(base: Dict[str, Any], space: Sequence[Dimension] = SPACE) -> Tuple[Dimension, ...]:
    """``space`` around recipe ``base``: relative ranges made absolute (factors of the base's value),
    then each range widened, or the choices extended, to hold the base's own value (trial 0)."""
    raw = with_loss_defaults(base)
    made = []
    for dim in space:
        if dim.relative:
            value = float(get_key(raw, dim.key))
            dim = dataclasses.replace(dim, low=dim.low * value, high=dim.high * value, relative=False)
        made.append(dim)
    chosen = base_choices(made, base)
    out = []
    for dim in made:
        value = chosen.get(dim.name, _MISSING)
        if value is _MISSING:
            out.append(dim)
        elif dim.choices:
            out.append(dim if value in dim.choices else dataclasses.replace(dim, choices=(*dim.choices, value)))
        else:
            out.append(dataclasses.replace(dim, low=min(dim.low, float(value)), high=max(dim.high, float(value))))
    return tuple(out)


def trial_recipe(space: Sequence[Dimension], base: Dict[str, Any], choose: Callable[[Dimension], Any]) -> Dict[str, Any]:
    """The recipe (a dict) of one trial: ``base`` with each dimension that applies, in table order,
    set to ``choose(dimension)`` (an Optuna suggestion); ``choose`` returning ``None`` leaves the key
    as the base has it (trial 0, for a value the space cannot hold)."""
    raw = copy.deepcopy(base)
    for dim in space:
        if not dim.applies(raw):
            continue
        choice = choose(dim)
        if choice is not None:
            set_key(raw, dim.key, dim.to_recipe(choice, get_key(raw, dim.key, None)))
    return raw


def describe_space(space: Sequence[Dimension] = SPACE) -> str:
    """The table, one dimension a line (``deepmetric tune --space`` prints it)."""
    return "\n".join(d.describe() for d in space)
