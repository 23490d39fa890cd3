"""``deepmetric train my_images/``: a recipe written from the data, each choice with its reason.

:func:`auto_config` inspects an image folder or a list file (:func:`deepmetric.data.inspect.inspect_data`),
chooses every key of an ordinary recipe, and returns it with one :class:`Choice` per decision (the
key, the value, and why, in a few words). ``key=value`` overrides apply last and win; a choice that
depends on an overridden key (the input size on ``model.pretrained``, the batch on the size of a
class) takes the override into account. The run writes the result as its ``config.yaml``, an
ordinary recipe that ``deepmetric train RUN/config.yaml`` repeats.

What is chosen from the data, and how:

- **format**: ``image_folder`` (one subfolder per class), ``csv`` (``path,label`` header) or ``list``
  (``path label`` lines); unreadable files are left out (``data.options.exclude``), with a note.
- **the zero-shot protocol**: :data:`TEST_SHARE` of the classes (at least 2) are the test classes,
  drawn by a stable hash of their names (:func:`hash_order`: sorted names group classes that are
  alike, such as neighbouring characters or one maker's products), never trained on; classes with
  one image are kept as distractors in the test gallery. A validation split of the training classes
  selects the checkpoint (:data:`VAL_SHARE`, at least :data:`MIN_VAL_CLASSES`), unless the training
  classes are few (:data:`FEW_CLASSES`): then see :func:`validation_rule`, and folds of them choose
  the length, whether an instance term joins the loss (``train.fold_candidates``), and, where they
  stop early and no pretrained weights are given, how many networks of that length the run's share
  of the budget trains as one ensemble (``train.fold_members``).
- **input**: the median image side, at most :data:`MAX_SIDE` (a pretrained backbone: its own input
  size); one channel when the images are grey; resized without cropping.
- **batch**: :data:`BATCH` images, ``K`` per class where ``K`` is at most the median class's image count.
- **model**: a pretrained backbone where there is one (``model.pretrained=PATH``, or a file in
  torchvision's or timm's download cache), else the small CNN of :data:`DEFAULTS`.
- **training**: the loss, miner, memory, augmentation, optimizer, schedule, width and embedding size of
  :data:`DEFAULTS`, chosen on a suite of data sets and proven on data sets they were not chosen on
  (``benchmarks/bench_suite.py``; the table and its commands are in ``docs/benchmarks.md``).
- **length**: ``train.time_budget`` (:data:`DEFAULTS`), or ``train.max_steps`` when given.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..config import Config, apply_overrides, parse_value, validate
from ..data.base import DataError
from ..data.inspect import LIST_SUFFIXES, DataProfile, describe_profile, inspect_data, mixed

log = logging.getLogger("deepmetric")

#: share of the classes held out as the unseen test classes (at least 2)
TEST_SHARE = 0.25
#: share of the training classes that validate (select the checkpoint) ...
VAL_SHARE = 0.1
#: ... at least this many classes
MIN_VAL_CLASSES = 4
#: below this many training classes a validation split is too small to select by (see validation_rule)
FEW_CLASSES = 30
#: the largest input side chosen for a network trained from scratch (the median image side, capped):
#: 32, chosen on the suite (at 64 px a step costs about 4 times as much on a CPU, and in the same
#: budget the icons' validation MAP@R fell from 0.24 to 0.18)
MAX_SIDE = 32
#: images per batch (P classes x K images)
BATCH = 64

#: The training defaults, chosen on the suite's validation splits (docs/benchmarks.md).
DEFAULTS: Dict[str, Any] = {
    "loss": {"name": "multi_similarity", "params": {"miner_epsilon": 0.1}},
    "transform": "tensor",
    "backbone": "small_cnn",
    "width": 16,
    "grid": 2,
    "embedding_dim": 128,
    "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
    "scheduler": {"name": "cosine", "warmup_steps": 20},
    "time_budget": "5m",
    "samples_per_class": 4,
    #: a cross-batch memory on the loss (XBM): None, or {size: "auto" (the training images, at most
    #: MEMORY_MAX) or a number, start_step, weight}; chosen on the suite: each batch is also compared
    #: with the embeddings of up to MEMORY_MAX earlier images, which the PML loop's batch alone lacks
    "memory": {"size": "auto"},
    #: ... when the training classes are at least this many (with fewer, a memory holds the same few
    #: classes again: it lowered validation MAP@R on the suite's few-class data sets)
    "memory_min_classes": FEW_CLASSES,
    "max_side": MAX_SIDE,
    "batch": BATCH,
    #: below FEW_CLASSES training classes: the length is chosen on this many folds of them
    #: (train.length_folds, see fold_classes; 0 = train the whole budget and keep the last step)
    "length_folds": 3,
    #: ... and with the folds, a moving average of the weights (train.ema) is what they score and the
    #: run keeps: it steadies their noisy curves (0 = off)
    "folds_ema": 0.99,
    #: ... and the folds compare the recipe with the recipe plus this instance term (each image against
    #: a second view of itself: losses.N.labels instance), and keep the better (None = the recipe
    #: alone). Chosen on the suite: the term raised one few-class data set's folds and lowered three,
    #: and where it lowers them the folds keep the recipe (docs/benchmarks.md, "the instance term")
    "fold_instance_term": {"name": "ntxent", "labels": "instance", "params": {"temperature": 0.1}},
    #: ... and the term must win the folds by more than this many standard errors of the fold-by-fold
    #: differences (train.fold_margin_se; 1: the one-standard-error rule): it lowers most data sets
    #: where it is not needed, and near the ceiling of a few-class fold a win by a hair is noise
    "fold_margin_se": 1.0,
    #: ... and the folds also score the pooled features under the projection, and the run retrieves
    #: them where they win by that margin (train.fold_retrieval, model.retrieval). Chosen on the suite's
    #: few-class folds: the pooled features won digits' and Fashion-MNIST's (5 training classes), the
    #: embedding all six 20-class tasks of CJK and icons (docs/benchmarks.md, "what the run retrieves")
    "fold_retrieval": True,
    #: ... and the run's share of the budget trains up to this many networks of the folds' length
    #: (train.fold_members: an ensemble, model.members) where it holds more than one; not with
    #: pretrained weights (the members would start alike, and each costs a large network's inference)
    "fold_members": 4,
    #: ... and then the folds take this share of the budget (train.fold_share), so that the run's
    #: share holds fold_members networks of any length the folds can choose: with six fold runs, each
    #: a tenth, and the run four tenths (without members each of the seven gets a seventh)
    "fold_members_share": 0.6,
}
#: the largest cross-batch memory the automatic recipe sizes to the training set
MEMORY_MAX = 16384


@dataclass(frozen=True)
class Choice:
    """One decision of the automatic recipe: the recipe key(s), the value, and why."""

    key: str
    value: Any
    reason: str

    def line(self) -> str:
        return f"  {self.key} = {_show(self.value)}: {self.reason}"


@dataclass
class AutoRecipe:
    """What :func:`auto_config` made: the recipe, its choices and notes, and the data it looked at."""

    config: Config
    choices: List[Choice]
    notes: List[str]
    profile: DataProfile
    overridden: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """The choices, one line each, then the notes (what was done about the data)."""
        lines = [f"{self.profile.source}: {describe_profile(self.profile)}"]
        lines += [c.line() for c in self.choices]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:3]))}, ... {len(value)} in all]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def is_data_path(target: str | os.PathLike) -> bool:
    """Whether ``deepmetric train TARGET`` means data (an image folder or a list file) rather than a
    recipe: a folder without ``config.yaml``, or a file ending in ``.csv``/``.txt``/``.lst``/``.list``."""
    p = Path(os.path.expanduser(os.fspath(target)))
    if p.is_dir():
        return not (p / "config.yaml").is_file()
    return p.is_file() and p.suffix.lower() in LIST_SUFFIXES


def hash_order(keys: Sequence[Any]) -> List[Any]:
    """``keys`` ordered by a stable hash of their text (SHA-1), the same on every machine and run.

    >>> hash_order(["a", "b", "c", "d"])
    ['d', 'c', 'a', 'b']
    """
    return sorted(keys, key=lambda k: hashlib.sha1(str(k).encode("utf-8")).hexdigest())


def split_classes(profile: DataProfile, test_share: float = TEST_SHARE):
    """``(train keys, test keys, distractors)``: the classes with two or more images, ordered by
    :func:`hash_order`, the first ``test_share`` of them (at least 2) tested; classes with one image
    are test distractors (they have no pair to learn from, and in the test gallery they are what a
    search must not return)."""
    counts = profile.counts
    keys = profile.class_keys
    paired = [keys[i] for i in range(len(keys)) if counts[i] >= 2]
    single = [keys[i] for i in range(len(keys)) if counts[i] < 2]
    order = hash_order(paired)
    n_test = min(max(2, int(round(test_share * len(order)))), len(order) - 2)
    test = set(order[:n_test])
    return [k for k in keys if k in set(paired) - test], [k for k in keys if k in test], single


def validation_rule(n_train: int):
    """``(val_classes, reason)`` for ``n_train`` training classes: :data:`VAL_SHARE` of them (at
    least :data:`MIN_VAL_CLASSES`); with fewer than :data:`FEW_CLASSES` classes, a selection on a
    handful of validation classes picks steps by noise, so there is none: every training class
    trains, and the run keeps its last step (the cosine schedule ends at a learning rate of zero)."""
    if n_train < FEW_CLASSES:
        return None, (f"only {n_train} training classes: a validation split of {max(2, round(VAL_SHARE * n_train))} "
                      f"would select by noise; all of them train and the last step is kept (the learning rate "
                      f"decays to zero)")
    n_val = max(MIN_VAL_CLASSES, int(round(VAL_SHARE * n_train)))
    return round(n_val / n_train, 4), f"{n_val} of the {n_train} training classes, held out, select the checkpoint"


def fold_classes(train_keys: Sequence[Any], folds: int) -> List[List[Any]]:
    """``train.length_folds`` for few training classes: up to ``folds`` folds of a fifth of them (at
    least 2) each, consecutive in :func:`hash_order` (wrapping round, so five classes give three folds
    of two); none when a fold would leave fewer than 2 classes to train on.

    >>> fold_classes(["a", "b", "c", "d", "e"], 3)
    [['d', 'e'], ['c', 'a'], ['b', 'd']]
    """
    n = len(train_keys)
    size = max(2, int(round(n / 5)))
    if folds <= 0 or n - size < 2:
        return []
    order = hash_order(train_keys)
    return [[order[(i * size + j) % n] for j in range(size)] for i in range(min(folds, -(-n // size)))]


def _override_value(overrides: Sequence[str], key: str) -> Any:
    """The value ``overrides`` give ``key`` (the last one), or ``...`` when they do not set it."""
    value: Any = ...
    for item in overrides:
        k, _, text = item.partition("=")
        if k.strip() == key:
            value = parse_value(text)
    return value


def auto_config(source: str | os.PathLike, overrides: Sequence[str] = (), name: Optional[str] = None) -> AutoRecipe:
    """The automatic recipe for the images of ``source`` (see the module docstring), with
    ``overrides`` (``key=value``) applied last.

    Raises:
        DataError: the data cannot be used (empty, one class, unreadable); one line naming the path.
        ConfigError: a bad override.
    """
    from ..models.pretrained import cached_weights, identify_weights

    profile = inspect_data(source)
    choices: List[Choice] = []
    notes: List[str] = []

    def choose(key: str, value: Any, reason: str) -> Any:
        given = _override_value(overrides, key)
        if given is not ...:
            choices.append(Choice(key, given, "set by you"))
            return given
        choices.append(Choice(key, value, reason))
        return value

    # -- data ----------------------------------------------------------------------------------------
    fmt_reason = {"image_folder": f"{len(profile.class_names):,} class folders",
                  "csv": "a CSV with path and label columns", "list": "a list of 'path label' lines"}[profile.format]
    options = dict(profile.options)
    if profile.unreadable:
        shown = "; ".join(f"{p}: {why}" for p, why in profile.unreadable[:2])
        notes.append(f"{len(profile.unreadable)} unreadable file{'s' if len(profile.unreadable) > 1 else ''} left out "
                     f"(data.options.exclude): {shown}{' ...' if len(profile.unreadable) > 2 else ''}")
    if profile.loose:
        notes.append(f"{profile.loose} images lie directly in {profile.source}, in no class folder: left out")
    train_keys, test_keys, single = split_classes(profile)
    choices.append(Choice("data.format", profile.format, fmt_reason))
    given_train, given_test = _override_value(overrides, "data.train_classes"), _override_value(overrides, "data.test_classes")
    if given_train is ... and given_test is ...:
        choices.append(Choice("data.test_classes", test_keys + single,
                              f"{len(test_keys)} of the {len(train_keys) + len(test_keys)} classes "
                              f"({TEST_SHARE:.0%}), drawn by a hash of their names, are never trained on: "
                              f"retrieval among them is the test"))
        if single:
            notes.append(f"{len(single)} class{'es' if len(single) > 1 else ''} with one image: kept as "
                         f"distractors in the test gallery")
        n_train, train_list = len(train_keys), list(train_keys)
    elif isinstance(given_train, list):
        n_train, train_list = len(given_train), list(given_train)
    elif given_train is ...:  # every class the test list leaves
        n_train = len(profile.class_keys) - len(given_test or [])
        # the training classes by name, where the test list names them (integers are class ids)
        named = isinstance(given_test, list) and set(given_test) <= set(profile.class_keys)
        train_list = [k for k in profile.class_keys if k not in set(given_test)] if named else None
    else:  # a fraction of the sorted classes: not known by name here
        n_train, train_list = int(round(given_train * len(profile.class_keys))), None
    val, val_reason = validation_rule(n_train)
    folds = fold_classes(train_list, DEFAULTS.get("length_folds", 0)) if val is None and train_list else []
    if folds:
        val_reason = (f"only {n_train} training classes: a validation split of {len(folds[0])} would select by "
                      f"noise; all of them train, for a length chosen on folds of them (train.length_folds)")
    val = choose("data.val_classes", val, val_reason)
    if val is not None:
        folds = []
    if folds:
        folds = choose("train.length_folds", folds,
                       f"{len(folds)} folds of {len(folds[0])} training classes: each trains without its classes "
                       f"and validates on them; the best step of their mean validation MAP@R is the run's length "
                       f"(the budget covers the folds)")
    ema = 0.0
    if folds and DEFAULTS.get("folds_ema"):
        ema = choose("train.ema", DEFAULTS["folds_ema"],
                     "a moving average of the weights (about the last 100 steps) is what the folds score and the run "
                     "keeps: it steadies the few classes' noisy validation curves (chosen on the suite's few-class folds)")

    # -- model and input -----------------------------------------------------------------------------
    pretrained = _override_value(overrides, "model.pretrained")
    known = None
    if pretrained not in (..., None, "imagenet"):
        known = identify_weights(pretrained) if _override_value(overrides, "model.backbone") is ... else None
    elif pretrained is ...:
        found = cached_weights()
        known = found[0] if found else None
    grey = profile.is_grey
    side = profile.median_side
    if known is not None:
        backbone = choose("model.backbone", known.backbone,
                          f"the pretrained weights {known.path} are for it" if pretrained is not ...
                          else f"pretrained weights found in the download cache: {known.path}")
        choose("model.pretrained", known.path, "its ImageNet weights")
        size = choose("data.image_size", list(known.input_size), f"{known.input_size[0]} x {known.input_size[1]}: "
                      f"the input size the backbone was trained at")
        transform = choose("data.transform", "xbm", "ImageNet normalisation, mild crops (scale 0.2-1) and flips")
        in_chans = choose("model.in_chans", 3, "the pretrained stem takes RGB")
        backbone_options: Dict[str, Any] = {}
        dim = choose("model.embedding_dim", 512, "a 512-d head on the pretrained features")
    else:
        backbone = choose("model.backbone", DEFAULTS["backbone"],
                          "no pretrained weights given or cached (model.pretrained=PATH uses a torchvision or "
                          "timm file)")
        backbone_options = {"width": DEFAULTS["width"], "grid": DEFAULTS["grid"]}
        backbone_options = choose("model.backbone_options", backbone_options,
                                  f"width {DEFAULTS['width']}, a {DEFAULTS['grid']}x{DEFAULTS['grid']} grid of the last "
                                  f"map (where a part is matters): chosen on the suite (more steps in the budget than width 32)")
        cap = DEFAULTS["max_side"]
        s = int(min(cap, max(8, 4 * round(side / 4))))
        size = choose("data.image_size", [s, s], f"{s} x {s}: the median image side is {side:g}"
                      + (f" (capped at {cap} for a network trained from scratch: more steps in the "
                                                           "budget, chosen on the suite)" if side > cap else ""))
        in_chans = choose("model.in_chans", 1 if grey else 3,
                          f"{profile.grey} of the {profile.checked} images opened are grey" if grey
                          else "the images are in colour")
        transform = choose("data.transform", DEFAULTS["transform"],
                           "resized whole, no random crops (a crop cuts away most of a small image): chosen on the suite")
        dim = choose("model.embedding_dim", DEFAULTS["embedding_dim"], "chosen on the suite")
    if profile.is_grey is False and profile.grey:
        notes.append(f"images of mixed colour ({mixed(profile)}): trained in colour")
    elif mixed(profile) and "sizes" in (mixed(profile) or ""):
        notes.append(f"images of mixed sizes ({mixed(profile)}): each resized to {size[0]} x {size[1]}")

    # -- batch, loss, optimisation -------------------------------------------------------------------
    counts = profile.counts
    median = float(np.median(counts[counts >= 2])) if (counts >= 2).any() else 2.0
    k = int(max(2, min(DEFAULTS["samples_per_class"], median)))
    n_val = 0 if val is None else max(2, int(round(val * n_train))) if isinstance(val, float) else len(val)
    p = int(max(2, min(DEFAULTS["batch"] // k, n_train - n_val)))
    k = choose("data.samples_per_class", k, f"the median class has {median:g} images")
    p = choose("data.classes_per_batch", p, f"{p} classes x {k} images = {p * k} per batch")
    loss = dict(DEFAULTS["loss"])
    memory = DEFAULTS.get("memory")
    if memory and n_train < DEFAULTS.get("memory_min_classes", 0):
        memory = None
        notes.append(f"no cross-batch memory: only {n_train} training classes (a memory would hold the same "
                     f"few classes again; on the suite's few-class data sets it lowered validation MAP@R)")
    if memory:
        n_images = int(counts[[i for i, key in enumerate(profile.class_keys) if key in set(train_keys)]].sum())
        slots = memory.get("size", "auto")
        slots = int(min(MEMORY_MAX, n_images)) if slots == "auto" else int(slots)
        loss["memory"] = {**{k: v for k, v in memory.items() if k != "size"}, "size": max(slots, p * k)}
    why = "chosen on the suite's validation splits (docs/benchmarks.md)"
    if loss.get("memory"):
        why = (f"multi-similarity, each batch also against a memory of the last {loss['memory']['size']:,} "
               f"embeddings (XBM): {why}")
    choices.append(Choice("losses", [loss], why))
    optimizer = DEFAULTS["optimizer"]
    choices.append(Choice("optimizer", optimizer, "chosen on the suite"))
    scheduler = DEFAULTS["scheduler"]
    choices.append(Choice("scheduler", scheduler, "cosine decay to zero after a short warm-up"))
    members, fold_share = 1, None
    if folds and DEFAULTS.get("fold_members", 1) > 1 and known is None:
        members = choose("train.fold_members", DEFAULTS["fold_members"],
                         "the run's share of the budget trains up to that many networks of the folds' length "
                         "instead of one, and their embeddings side by side are the model's: "
                         "two seeds of a few-class run differ by as much as training gains, and the ensemble "
                         "averages that away (chosen on the suite's few-class folds)")
        if members and members > 1 and DEFAULTS.get("fold_members_share"):
            fold_share = choose("train.fold_share", DEFAULTS["fold_members_share"],
                                f"the folds take {DEFAULTS['fold_members_share']:.0%} of the budget, so that what is "
                                f"left holds {members} networks of any length they can choose (folds that short chose "
                                f"as well on the suite's few-class validation folds)")
    steps = _override_value(overrides, "train.max_steps")
    budget = _override_value(overrides, "train.time_budget")
    if steps is not ... and budget is ...:
        budget = None
        choices.append(Choice("train.max_steps", steps, "set by you"))
    else:
        budget = choose("train.time_budget", DEFAULTS["time_budget"],
                        "the default length (train.time_budget=10m, or train.max_steps=N, to change it)")

    raw = {
        "name": name or _run_name(profile.source),
        "seed": 0,
        "data": {"format": profile.format, "root": profile.root, "options": options,
                 "transform": transform, "image_size": size,
                 "classes_per_batch": p, "samples_per_class": k, "val_classes": val,
                 "test_classes": test_keys + single},
        "model": {"backbone": backbone, "backbone_options": backbone_options, "in_chans": in_chans,
                  "embedding_dim": dim, "pretrained": None if known is None else known.path},
        "losses": [loss],
        "optimizer": optimizer,
        "scheduler": scheduler,
        "train": {"time_budget": budget, "eval_every": 0, "log_every": 25, "length_folds": folds, "ema": ema,
                  "fold_members": members, "fold_share": fold_share},
        "eval": {"protocol": "retrieval", "metric": "map@r", "ks": [1, 2, 4, 8], "distance": "cosine"},
    }
    if steps is not ... and budget is None:
        raw["train"]["max_steps"] = steps
    if given_train is not ... or given_test is not ...:
        raw["data"]["test_classes"] = None
    source = f"{profile.source} (automatic recipe) with overrides"
    cfg = validate(apply_overrides(raw, list(overrides)), source)
    cfg = _fold_choices(cfg, overrides, choices, source)
    overridden = [o.split("=", 1)[0] for o in overrides]
    return AutoRecipe(cfg, choices, notes, profile, overridden)


def _fold_choices(cfg: Config, overrides: Sequence[str], choices: List[Choice], source: str) -> Config:
    """With ``train.length_folds``, what else the folds choose: the instance term
    (``train.fold_candidates``), the retrieval (``train.fold_retrieval``), and the margin either must
    win by (``train.fold_margin_se``); each as :data:`DEFAULTS` says unless overridden."""
    if not cfg.train.length_folds:
        return cfg
    raw = cfg.to_dict()
    term = DEFAULTS.get("fold_instance_term")
    given_candidates = _override_value(overrides, "train.fold_candidates")
    if given_candidates is not ...:
        choices.append(Choice("train.fold_candidates", given_candidates, "set by you"))
    elif term:
        with_term = [t.model_dump(mode="json") for t in cfg.losses] + [dict(term)]  # the losses as overridden
        raw["train"]["fold_candidates"] = [{}, {"losses": with_term}]
        choices.append(Choice("train.fold_candidates", "the recipe, and the recipe with an instance term",
                              "the folds compare them and keep the better: an instance term (each image against a "
                              "second view of itself) keeps features a few classes do not ask for; on the suite it "
                              "raised one few-class data set and lowered three"))
    given = any(_override_value(overrides, key) is not ... for key in ("train.fold_retrieval", "model.retrieval"))
    if DEFAULTS.get("fold_retrieval") and not given and cfg.model.embedding_dim:
        raw["train"]["fold_retrieval"] = True
        choices.append(Choice("train.fold_retrieval", True,
                              "the folds also score the pooled features under the projection, and the run retrieves "
                              "them where they win: trained on a few classes, the projection narrows to them (on the "
                              "suite they won the 5-class folds, and lost every 20-class task's)"))
    searched = raw["train"].get("fold_candidates") or raw["train"].get("fold_retrieval")
    own = given_candidates is not ... and given_candidates  # candidates of your own: the best mean wins,
    if searched and not own and _override_value(overrides, "train.fold_margin_se") is ...:  # unless you give a margin
        raw["train"]["fold_margin_se"] = se = DEFAULTS.get("fold_margin_se", 0.0)
        choices.append(Choice("train.fold_margin_se", se,
                              f"the term or the pooled features must win by more than {'one' if se == 1 else f'{se:g}'} "
                              f"standard error{'' if se == 1 else 's'} of the folds' differences (the "
                              "one-standard-error rule): near the top of a few-class fold a win by a hair is noise"))
    return validate(raw, source)


def _run_name(source: str) -> str:
    p = Path(source)
    return (p.stem if p.is_file() else p.name) or "run"


def recipe_or_data(target: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[Config, List[str]]:
    """``(config, notes)`` that ``deepmetric train TARGET`` trains: the automatic recipe of a data
    folder or list (:func:`is_data_path`) and its notes, else the recipe (a file, a run directory or
    a packaged name)."""
    from ..config import load_config, resolve_recipe

    if is_data_path(target):
        auto = auto_config(target, overrides)
        return auto.config, list(auto.notes)
    return load_config(resolve_recipe(target), overrides), []


__all__ = ["AutoRecipe", "Choice", "DataError", "auto_config", "hash_order", "is_data_path", "recipe_or_data",
           "fold_classes", "split_classes", "validation_rule"]
