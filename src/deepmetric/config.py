"""Recipes: a YAML file plus ``key=value`` overrides, validated into a frozen :class:`Config`.

Every section forbids unknown keys: a typo fails with its full key path and the closest valid names
(``unknown key 'train.max_step'; did you mean 'max_steps'?``). Wrong types and values name the key and
what was expected. Free-form sections (``data.options``, ``losses.N.params``) are checked when the
thing they configure is built, with the same kind of message.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .core.errors import UserError
from .core.files import atomic_write


class ConfigError(UserError):
    """A bad recipe or override; one line naming the key (or file) and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    format: str = "digits"
    root: Optional[str] = None
    options: Dict[str, Any] = Field(default_factory=dict)
    transform: str = "tensor"
    image_size: Optional[Tuple[int, int]] = None
    classes_per_batch: int = Field(8, ge=1)
    samples_per_class: int = Field(4, ge=1)
    #: loader processes: a number, or ``auto`` (CUDA: the CPUs this rank may use, less one for the
    #: training process, at most 16; CPU: 0, decoding in the training process)
    num_workers: Union[int, str] = "auto"
    #: page-locked batches for faster host-to-GPU copies; ``auto`` = on CUDA
    pin_memory: Union[bool, str] = "auto"
    #: image files decode into: ``torchvision`` uint8 tensors (faster), ``pil`` images, or ``auto``
    #: (torchvision unless the transform preset needs PIL, e.g. ``paddle_sop``'s Lanczos resizing)
    decoder: Literal["auto", "pil", "torchvision"] = "auto"
    #: loader workers send uint8 images and the batch is normalised on the device (a quarter of the
    #: bytes to copy); ``auto`` = on CUDA, for presets that end in normalisation (not ``reid``)
    normalize_on_device: Union[bool, str] = "auto"
    #: keep each image's decoded, resized input in memory after its first use (the deterministic
    #: steps of the pipeline; random ones still run on every read): ``auto`` (up to a quarter of
    #: the memory, at most 4 GiB), a limit in GiB, or false. The same tensors, so the same run; in
    #: the training process only (none with loader workers). See :mod:`deepmetric.data.cache`
    cache: Union[bool, float, str] = "auto"

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v):
        if v == "auto" or isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v >= 0:
            return float(v)
        raise ValueError("expected auto, false, true or a memory limit in gibibytes (a number >= 0)")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v):
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("expected a number of processes >= 0 or 'auto'")
        return v

    @field_validator("pin_memory", "normalize_on_device", mode="before")
    @classmethod
    def _pin(cls, v):
        if v == "auto" or isinstance(v, bool):
            return v
        raise ValueError("expected true, false or 'auto'")
    eval_batch_size: int = Field(256, ge=1)
    drop_singletons: bool = False
    #: zero-shot class split, for any format: the classes that train and the classes that are tested,
    #: each a list of class ids (numbers) or names (strings: folder names, CSV labels, characters);
    #: ``train_classes`` may be a fraction (the first fraction of the sorted class ids). Give either
    #: or both; the other is every remaining class. null: the format's own split.
    train_classes: Optional[Union[float, List[Union[int, str]]]] = None
    test_classes: Optional[List[Union[int, str]]] = None
    #: validation split for model selection, carved from the training classes (never the test
    #: classes): a fraction of them, drawn with ``val_seed``, or a list of ids or names. ``best``,
    #: ``scheduler.name=plateau`` and ``train.early_stopping`` follow it. null: no validation split
    #: (the last step is reported, not selected).
    val_classes: Optional[Union[float, List[Union[int, str]]]] = None
    val_seed: int = 0
    #: at most this many images of each validation class are scored (drawn with ``val_seed``; all of
    #: them still leave the training set): cheaper evaluations of large classes. null: all
    val_per_class: Optional[int] = Field(None, ge=2)

    @field_validator("train_classes", "val_classes", mode="before")
    @classmethod
    def _fraction(cls, v):
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("expected a fraction in (0, 1) or a list of classes")
        return v
    #: training batches: ``pk`` (classes_per_batch x samples_per_class, class by class) or ``random``
    #: (a shuffled pass over the images in chunks of ``batch_size``, the last partial chunk dropped)
    sampler: Literal["pk", "random"] = "pk"
    #: images per batch and process for ``sampler: random``; null = classes_per_batch x samples_per_class
    batch_size: Optional[int] = Field(None, ge=1)


class ModelConfig(_Section):
    backbone: str = "small_cnn"
    backbone_options: Dict[str, Any] = Field(default_factory=dict)
    in_chans: int = Field(3, ge=1)
    pretrained: Optional[str] = None
    init_from: Optional[str] = None
    embedding_dim: int = Field(0, ge=0)
    #: global pooling of the backbone's map; ``avgmax`` = average + max, summed (Proxy-Anchor)
    pooling: Literal["avg", "max", "gem", "avgmax"] = "avg"
    bnneck: bool = False
    normalize: bool = True
    #: what retrieval (evaluation, embed, search, export) uses: ``embedding`` (the head's, what the
    #: losses train), or ``pooled``: the pooled features before the projection, L2-normalised with
    #: ``normalize``. ``train.fold_retrieval`` lets folds of the training classes choose
    retrieval: Literal["embedding", "pooled"] = "embedding"
    #: keep every BatchNorm of the backbone in eval mode (running statistics frozen) during training
    freeze_bn: bool = False
    #: with ``freeze_bn``, also freeze the BatchNorm weight and bias (False: they keep training)
    freeze_bn_affine: bool = True
    #: an ensemble of this many networks of this recipe, each of its own initial weights and its own
    #: loss, trained on the same batches; its embedding is theirs side by side (``members x`` the
    #: dimension), L2-normalised: the mean of their cosine similarities. ``train.fold_members`` sets it
    members: int = Field(1, ge=1)


class MemoryConfig(_Section):
    size: int = Field(..., ge=1)
    start_step: int = Field(0, ge=0)
    weight: float = 1.0


#: the lr of a loss term's own optimizer when the recipe gives none (Centroids-ReID's centre-loss SGD)
OWN_OPTIMIZER_LR = 0.5


class LossTerm(_Section):
    name: str
    weight: float = 1.0
    input: Literal["embedding", "features", "neck"] = "embedding"
    params: Dict[str, Any] = Field(default_factory=dict)
    #: ``class``: the term compares the batch's images by class. ``instance``: each image is a class of
    #: its own, seen twice (as the batch gives it and under a small random affine drawn from the seed
    #: and the step, :func:`deepmetric.engine.step.second_view`): a self-supervised term that keeps
    #: features the training classes alone do not ask for. A pair loss without memory; each image costs
    #: a second forward and backward pass. Not a default: see docs/benchmarks.md ("instance term").
    labels: Literal["class", "instance"] = "class"
    memory: Optional[MemoryConfig] = None
    #: this term's parameters' lr (in the main optimizer, or in its own); with ``optimizer: sgd`` and
    #: no ``lr``, :data:`OWN_OPTIMIZER_LR`
    lr: Optional[float] = Field(None, gt=0)
    #: ``sgd``: the term's parameters get an optimizer of their own, outside the lr schedule
    optimizer: Optional[Literal["sgd"]] = None

    @model_validator(mode="before")
    @classmethod
    def _own_lr(cls, v):
        if isinstance(v, dict) and v.get("optimizer") and v.get("lr") is None:
            return {**v, "lr": OWN_OPTIMIZER_LR}
        return v


class ParamGroup(_Section):
    match: str
    lr: Optional[float] = Field(None, gt=0)
    lr_mult: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)


class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    betas: Tuple[float, float] = (0.9, 0.999)
    param_groups: List[ParamGroup] = Field(default_factory=list)


class SchedulerConfig(_Section):
    name: Literal["constant", "step", "multistep", "cosine", "plateau"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_factor: float = Field(0.01, gt=0, le=1)
    step_size: int = Field(1000, ge=1)
    milestones: List[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)
    patience: int = Field(4, ge=0)
    threshold: float = Field(1e-3, ge=0)
    cooldown: int = Field(0, ge=0)
    #: the steps ``cosine`` decays over (null: ``train.max_steps``); a run that stops earlier keeps
    #: the lr of that point of the longer schedule (``train.length_folds`` chooses such a length)
    total_steps: Optional[int] = Field(None, ge=1)


def parse_duration(value: Union[str, int, float]) -> float:
    """Seconds from ``"90s"``, ``"10m"``, ``"1h30m"``, ``"1.5h"`` or a number of seconds.

    >>> parse_duration("1h30m"), parse_duration("90s"), parse_duration(45), parse_duration("2.5m")
    (5400.0, 90.0, 45.0, 150.0)
    """
    import re

    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 10m or 1h30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError("expected a duration such as 90s, 10m or 1h30m") from None
        else:
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not seconds > 0:
        raise ValueError("expected a positive duration")
    return seconds


class TrainConfig(_Section):
    max_steps: int = Field(1000, ge=1)
    #: train for about this long instead of ``max_steps`` (``90s``, ``10m``, ``1h30m``; the whole run:
    #: evaluations included): the run measures a step and an evaluation, then trains for the steps
    #: that fit, and its ``config.yaml`` records that ``max_steps`` (and this key as null), so the same
    #: config repeats the run exactly. null: ``max_steps``.
    time_budget: Optional[Union[str, float]] = None
    eval_every: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    amp: Literal["off", "bf16", "fp16"] = "off"
    grad_clip: float = Field(0.0, ge=0)
    #: clip every gradient entry to [-v, v] (``clip_grad_value_``) on model and loss parameters; 0 = off
    grad_clip_value: float = Field(0.0, ge=0)
    #: for the first N steps only the head and the losses' parameters are updated, not the backbone
    freeze_backbone_steps: int = Field(0, ge=0)
    #: auto (CUDA where available, else the CPU), cpu, cuda, cuda:N, mps or xpu
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|(cuda|xpu)(:[0-9]+)?)$")
    #: train convolutions in NHWC memory order; ``auto`` = on a CPU for a network with 2-d
    #: convolutions (oneDNN's preferred order: a training step of the glyph benchmark's CNN takes
    #: 58 ms instead of 84 on one core, ``benchmarks/bench_cpu_step.py``), off on GPUs
    channels_last: Union[bool, str] = "auto"
    compile: bool = False
    #: CPU threads the run computes with (``torch.set_num_threads`` for the run, restored after it).
    #: 0: torch's default, except that a ``time_budget`` run on the CPU times its steps on one thread
    #: as well and keeps the faster: on a busy machine torch's threads wait for one another (a step of
    #: the digits recipe took 28-554 ms on two threads of a 2-core machine running two other jobs,
    #: 6-22 ms on one). ``config.yaml`` then records the count kept, so the repeat computes alike.
    threads: int = Field(0, ge=0)
    #: decay of an exponential moving average of the weights (0 = off; 0.99 averages about the last
    #: 100 steps): evaluation, selection and the checkpoints' weights use the average, training the
    #: live weights (see :mod:`deepmetric.engine.averaging`)
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    progress: bool = True
    deterministic: bool = True
    #: stop after this many evaluations in a row without a better validation ``eval.metric``; 0 = off
    early_stopping: int = Field(0, ge=0)
    #: choose the run's length on folds of the training classes, for data with too few classes for a
    #: validation split (``data.val_classes`` null): a list of folds, each a list of training classes.
    #: Each fold trains without its classes and validates on them; the step with the best mean
    #: validation ``eval.metric`` over the folds is how long the run then trains on all of them (the
    #: schedule keeps the folds' length: ``scheduler.total_steps``). The budget covers the folds:
    #: with ``train.time_budget`` or ``train.max_steps``, each fold and the run get a
    #: ``1/(folds + 1)`` share. See :mod:`deepmetric.engine.folds`. Empty: off.
    length_folds: List[List[Union[int, str]]] = Field(default_factory=list)
    #: with ``length_folds``: recipes the folds compare, each a mapping of dotted keys to values
    #: (``{}``: the recipe as it is; ``{"optimizer.lr": 0.0003}``; ``{"losses": [...]}``). Every
    #: candidate trains on every fold; the candidate and step with the best mean validation are the
    #: run's (``config.yaml`` then holds that candidate's values). Empty: the recipe alone.
    fold_candidates: List[Dict[str, Any]] = Field(default_factory=list)
    #: with ``fold_candidates``: a later candidate replaces the first (the incumbent) only where its
    #: mean validation value beats the first's by more than this many standard errors of their
    #: fold-by-fold differences (each fold's value at each candidate's own chosen step); 1 is the
    #: one-standard-error rule. 0: the best mean wins
    fold_margin_se: float = Field(0.0, ge=0)
    #: with ``length_folds``: the share of the budget (``time_budget`` or ``max_steps``) that the fold
    #: runs take together, split evenly between them; null: each fold run and the run itself get
    #: ``1/(runs + 1)``
    fold_share: Optional[float] = Field(None, gt=0, lt=1)
    #: with ``length_folds``: when the folds' mean validation curve is at its best at its last step
    #: (nothing they measured says a longer run would do worse), the run trains for what is left of
    #: the budget, its schedule over that length, instead of stopping at the folds' length
    fold_extend: bool = False
    #: with ``length_folds``: at most this many networks (``model.members``), each trained for the
    #: folds' length, as many as the run's share of the budget holds (its steps over that length):
    #: an early stop leaves that share to more members instead of unspent; 1: one network
    fold_members: int = Field(1, ge=1)
    #: with ``length_folds``: the folds also score the pooled features under the projection
    #: (``model.retrieval: pooled``) on their held-out classes, and the run keeps them where they lead
    #: the embedding by more than ``fold_margin_se`` standard errors (each at its own best step, which
    #: is then the length); needs ``model.embedding_dim`` (a projection to look under)
    fold_retrieval: bool = False

    @field_validator("length_folds")
    @classmethod
    def _folds(cls, v):
        if any(not fold for fold in v):
            raise ValueError("every fold needs at least one class")
        return v

    @field_validator("time_budget")
    @classmethod
    def _duration(cls, v):
        if v is not None:
            parse_duration(v)
        return v

    @field_validator("channels_last", mode="before")
    @classmethod
    def _auto_or_bool(cls, v):
        if v == "auto" or isinstance(v, bool):
            return v
        raise ValueError("expected true, false or 'auto'")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v):  # a bare `off` is YAML 1.1 for False
        return "off" if v is False else v


class QueryExpansionConfig(_Section):
    """Average query expansion (FastReID ``TEST.AQE``): see :mod:`deepmetric.evaluation.query_expansion`."""

    k: int = Field(5, ge=1)
    alpha: float = 3.0
    times: int = Field(1, ge=1)


class EvalConfig(_Section):
    protocol: Literal["retrieval", "reid", "verification"] = "retrieval"
    #: the validation metric that selects ``best`` (higher is better)
    metric: str = "recall@1"
    ks: List[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8])
    #: evaluate the network before the first step (validation and test), shown beside the trained one
    untrained: bool = True
    #: also evaluate the test split at every evaluation during training (logged as ``test``, never
    #: used to select); without a validation split the test split is evaluated there anyway
    test_during_training: bool = False
    distance: Literal["cosine", "euclidean", "squared_euclidean"] = "cosine"
    rerank: bool = False
    #: alpha-weighted average query expansion before ranking (queries and gallery), e.g. ``{k: 5}``
    query_expansion: Optional[QueryExpansionConfig] = None
    centroids: bool = False
    flip: bool = False
    lfw_root: Optional[str] = None
    lfw_pairs: Optional[str] = None
    max_rank: int = Field(50, ge=1)
    worst_queries: int = Field(8, ge=0)
    #: the report's 2-D picture of the test embeddings (at most 20 classes, 1000 points): ``pca``
    #: (fast, deterministic), ``tsne``, ``umap`` (needs umap-learn) or ``none``
    projection: Literal["pca", "tsne", "umap", "none"] = "pca"


class MLflowConfig(_Section):
    """MLflow tracking (the ``mlflow`` extra): params, per-step metrics, artefacts at the end."""

    #: where runs go; null: ``$MLFLOW_TRACKING_URI``, else ``./mlruns`` in the current directory (a
    #: file store, which ``mlflow ui --backend-store-uri ./mlruns`` shows)
    tracking_uri: Optional[str] = None
    experiment: str = Field("deepmetric", min_length=1)
    #: null: the recipe's ``name``
    run_name: Optional[str] = None
    #: also upload ``checkpoints/best`` (the weights) as an artefact
    log_checkpoint: bool = True


class TrackingConfig(_Section):
    """Experiment trackers, each off while null (``tracking.mlflow={}`` turns MLflow on)."""

    mlflow: Optional[MLflowConfig] = None


class Config(_Section):
    name: str = "run"
    seed: int = 0
    run_dir: Optional[str] = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    losses: List[LossTerm] = Field(default_factory=lambda: [LossTerm(name="triplet", params={"mining": "hard"})])
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: Sequence[str]) -> "Config":
        return validate(apply_overrides(self.to_dict(), overrides))


# -- loading -------------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """Override values are YAML scalars: ``128`` -> int, ``null`` -> None, ``[1, 2]`` -> list."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Set ``a.b.c=value`` (and ``losses.0.params.margin=0.2``) in a nested dict, returning a copy."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.max_steps=100)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key segment")
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(node, part, path)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{item}': '{path}' is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = parse_value(text)
        else:
            node[last] = parse_value(text)
    return out


def _list_index(node: list, part: str, path: str) -> int:
    try:
        i = int(part)
    except ValueError:
        raise ConfigError(f"'{path}': expected a list index (0..{len(node) - 1}), got '{part}'") from None
    if not 0 <= i < len(node):
        raise ConfigError(f"'{path}': list index {i} out of range (the list has {len(node)} items)")
    return i


def _section_at(loc: Tuple[Any, ...]) -> Optional[Type[BaseModel]]:
    """The pydantic model that owns the field at ``loc[-1]`` (for 'did you mean' hints)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
            else:
                continue
            break
        else:
            return None
    return model


def _format_error(err: Dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        section = _section_at(loc)
        valid = list(section.model_fields) if section is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown config key '{key}'{hint} (valid here: {', '.join(valid)})"
    if err["type"] == "missing":
        return f"config key '{key}' is required"
    got = err.get("input")
    msg = err["msg"].lower().removeprefix("value error, ")  # our own validators' words, unprefixed
    return f"config key '{key}': {msg} (got {got!r})"


def validate(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        msg = _format_error(errors[0])
        if len(errors) > 1:
            msg += f" (+{len(errors) - 1} more problems)"
        raise ConfigError(f"{source}: {msg}") from None
    if cfg.train.length_folds and cfg.data.val_classes is not None:
        raise ConfigError(f"{source}: train.length_folds chooses the length where there is no validation split; "
                          f"give data.val_classes=null, or train.length_folds=[]")
    if cfg.train.fold_candidates:
        if not cfg.train.length_folds:
            raise ConfigError(f"{source}: train.fold_candidates are compared on the folds of train.length_folds, "
                              f"which is empty; give both, or train.fold_candidates=[]")
        for j in range(len(cfg.train.fold_candidates)):
            with_candidate(cfg, j, source)  # each candidate is a valid recipe
    if cfg.train.fold_retrieval:
        if not cfg.train.length_folds:
            raise ConfigError(f"{source}: train.fold_retrieval is chosen on the folds of train.length_folds, which is "
                              f"empty; give both, or train.fold_retrieval=false")
        if not cfg.model.embedding_dim:
            raise ConfigError(f"{source}: train.fold_retrieval compares the embedding with the pooled features under "
                              f"its projection, and model.embedding_dim is 0 (no projection); set "
                              f"train.fold_retrieval=false")
    return cfg


def with_candidate(cfg: Config, j: int, source: str = "config") -> Config:
    """``cfg`` with the values of its ``train.fold_candidates[j]`` (and no candidates)."""
    candidate = cfg.train.fold_candidates[j]
    key = f"train.fold_candidates.{j}"
    raw = cfg.to_dict()
    raw["train"]["fold_candidates"] = []
    try:
        raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in candidate.items()])
    except ConfigError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None
    return validate(raw, f"{source}: {key}")


#: the packaged recipes (``configs/`` at the top of a checkout is a link to it)
RECIPES = Path(__file__).parent / "configs"


def list_recipes() -> List[str]:
    """Names of the packaged recipes (``quickstart``, ``sop/xbm_contrastive_resnet50``, ...)."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))


def resolve_recipe(name: str | Path) -> Path:
    """A recipe file, a run directory, or the name of a packaged recipe (``sop/eml_finetune``)."""
    p = Path(name)
    if p.exists():
        return p
    packaged = RECIPES / (str(name) if str(name).endswith(".yaml") else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    raise ConfigError(f"config file not found: {name} (packaged recipes: {', '.join(list_recipes())})")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe (a YAML file, a run directory, or a packaged recipe's name such as
    ``"quickstart"``; defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: Dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_recipe(path)
        if p.is_dir() and (p / "config.yaml").is_file():
            p = p / "config.yaml"  # a run directory
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        source = str(p)
    cfg = validate(raw, source)
    if overrides:  # overrides act on the resolved recipe, so defaults (e.g. losses.0) can be addressed
        cfg = validate(apply_overrides(cfg.to_dict(), overrides), f"{source} with overrides")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
