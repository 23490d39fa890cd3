"""``concat``: several datasets in one run, each built by its own registered format.

```yaml
data:
  format: concat
  options:
    parts:
      - {format: digits}
      - {format: image_folder, root: /data/logos, name: logos, train_classes: 0.5}
  train_classes: ...   # optional: the zero-shot split of the union (ids or "part/class" names)
```

Each part is ``{format, root, options, name, train_classes, test_classes}`` (only ``format`` is
required; ``name`` defaults to the format and must differ between parts; a relative ``root`` is taken
under ``data.root`` when that is set; ``train_classes`` / ``test_classes`` split that part's classes
as the top-level keys split a format's, before the union). The union's class ids are each part's
own ids shifted past the previous parts' (part ``p``'s id ``c`` is ``offset[p] + c``), so no two
parts share a class; class names are ``"<part name>/<class name>"``. Training, query and gallery
sets are the parts' concatenated; then ``data.train_classes`` / ``test_classes`` / ``val_classes``
apply to the union (:func:`deepmetric.data.protocol.apply`).

Every part's images go through the recipe's one transform (``data.transform``, ``data.image_size``,
``model.in_chans``), so give a size that suits them all (``data.image_size``: digits are 8 x 8).
A part's test set is leave-one-out or query + gallery, and all parts must agree; verification
formats (pairs, such as ``lfw``) cannot be concatenated.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from ...core.errors import ParameterError
from ...core.registry import UnknownNameError
from ..base import DataError, DataSplits, MetricDataset
from ..protocol import ClassSplitError, original_train_labels, split_classes

PART_KEYS = ("format", "root", "options", "name", "train_classes", "test_classes")
_FIXED = ("root", "train_transform", "test_transform")


class ConcatDataset(MetricDataset):
    """``parts`` one after the other, item ``i`` of part ``p`` at ``starts[p] + i``, with ``labels``
    given for the whole (the union's class ids). Camera ids and paths are kept where every part has
    them. Items are read from their part raw and go through this dataset's ``transform``."""

    def __init__(self, parts: Sequence[MetricDataset], labels: np.ndarray, transform: Optional[Callable] = None,
                 name: str = "concat") -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        camids = None if any(p.camids is None for p in self.parts) else np.concatenate([p.camids for p in self.parts])
        paths = None if any(p.paths is None for p in self.parts) else [x for p in self.parts for x in p.paths]
        super().__init__(labels, camids, paths, transform, name)

    def _locate(self, i: int) -> tuple:
        p = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[p], i - int(self.starts[p])

    def load(self, i: int) -> Any:
        part, j = self._locate(int(i))
        return part.load(j)

    def read(self, i: int, decoder: str = "pil", channels: Optional[int] = None) -> Any:
        part, j = self._locate(int(i))
        return part.read(j, decoder, channels)


def _part_spec(i: int, part: Any, root: Optional[str]) -> Dict[str, Any]:
    if not isinstance(part, Mapping) or "format" not in part:
        raise ParameterError(f"{{parts}}[{i}]: expected a mapping with at least 'format' (and root, options, name), "
                             f"got {part!r}", "parts")
    unknown = [k for k in part if k not in PART_KEYS]
    if unknown:
        raise ParameterError(f"{{parts}}[{i}]: unknown key {unknown[0]!r} (valid: {', '.join(PART_KEYS)})", "parts")
    spec = {"root": None, "options": {}, "name": str(part["format"]), **part}
    if not isinstance(spec["options"], Mapping):
        raise ParameterError(f"{{parts}}[{i}].options: expected a mapping, got {spec['options']!r}", "parts")
    if spec["root"] is not None and root and not os.path.isabs(str(spec["root"])):
        spec["root"] = os.path.join(root, str(spec["root"]))
    return spec


def _build_part(i: int, spec: Dict[str, Any], train_transform, test_transform, formats: Any) -> DataSplits:
    """One part's splits by its format in ``formats``, its option names checked as ``data.options``' are."""
    try:
        builder = formats.get(spec["format"])
    except UnknownNameError as e:
        raise ParameterError(f"{{parts}}[{i}].format: {e}", "parts") from None
    if builder is formats.get("concat"):
        raise ParameterError(f"{{parts}}[{i}].format: a concat part cannot itself be concat; list its parts here",
                             "parts")
    valid = [p for p in inspect.signature(builder).parameters if p not in _FIXED]
    for key in spec["options"]:
        if key not in valid:
            raise ParameterError(f"{{parts}}[{i}].options.{key}: format '{spec['format']}' has no option '{key}' "
                                 f"(valid: {', '.join(valid) or 'none'})", "parts")
    keys = {"root": f"{{parts}}[{i}].root", **{k: f"{{parts}}[{i}].options.{k}" for k in valid}}
    try:
        splits = builder(spec["root"], train_transform=train_transform, test_transform=test_transform,
                         **spec["options"])
        return split_classes(splits, spec.get("train_classes"), spec.get("test_classes"))
    except ClassSplitError as e:
        raise DataError(f"{{parts}}[{i}] ({spec['name']}): " + e.naming(
            {k: f"{{parts}}[{i}].{k}" for k in e.params}), "parts") from None
    except ParameterError as e:  # DataError included: it names the part's root or option
        kind = DataError if isinstance(e, DataError) else ParameterError
        raise kind(f"{{parts}}[{i}] ({spec['name']}): " + e.naming(keys), "parts") from None


def _own_ids(s: DataSplits) -> np.ndarray:
    ids = [original_train_labels(s)] if s.train is not None else []
    ids += [d.labels for d in (s.query, s.gallery) if d is not None]
    ids.append(np.fromiter((s.class_names or {}).keys(), np.int64))
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def build_concat(root: Optional[str] = None, *, train_transform: Optional[Callable] = None,
                 test_transform: Optional[Callable] = None, parts: Sequence[Mapping[str, Any]] = (),
                 formats: Any) -> DataSplits:
    """The union of ``parts`` (see the module docstring): training, query and gallery sets
    concatenated, class ids offset per part, class names prefixed with the part's name. ``formats``
    is the catalogue the parts' formats are looked up in (:data:`~deepmetric.data.formats.DATASETS`,
    which registers this builder with itself)."""
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or len(parts) < 1:
        raise ParameterError("{parts}: a list of parts ({format: ..., root: ..., options: {...}}), got "
                             f"{parts!r}", "parts")
    specs = [_part_spec(i, p, root) for i, p in enumerate(parts)]
    names = [s["name"] for s in specs]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ParameterError(f"{{parts}}[{i}]: name {n!r} is taken by parts[{names.index(n)}]; give each part "
                                 "a distinct 'name'", "parts")
    built = [_build_part(i, s, train_transform, test_transform, formats) for i, s in enumerate(specs)]
    for i, s in enumerate(built):
        if s.pairs is not None:
            raise DataError(f"{{parts}}[{i}] ({names[i]}): a verification format (pairs) cannot be concatenated; "
                            "evaluate it on its own, e.g. with eval.lfw_root", "parts")
    tested = [i for i, s in enumerate(built) if s.query is not None]
    kinds = {built[i].gallery is None for i in tested}
    if len(kinds) > 1:
        loo = [names[i] for i in tested if built[i].gallery is None]
        raise DataError(f"{{parts}}: {', '.join(loo)} test leave-one-out but the other parts have a query and a "
                        "gallery; concatenate parts with the same kind of test set", "parts")
    offsets, class_names, start = [], {}, 0
    for s, n in zip(built, names):
        own = _own_ids(s)
        offsets.append(start)
        for c in own.tolist():
            class_names[start + c] = f"{n}/{(s.class_names or {}).get(c, c)}"
        start += int(own.max()) + 1 if len(own) else 0

    def union(side: str, transform) -> Optional[ConcatDataset]:
        have = [(s, off) for s, off in zip(built, offsets) if getattr(s, side) is not None]
        if not have:
            return None
        labels = [(original_train_labels(s) if side == "train" else getattr(s, side).labels) + off for s, off in have]
        return ConcatDataset([getattr(s, side) for s, _ in have], np.concatenate(labels), transform,
                             name=f"concat/{side}")

    train = union("train", train_transform)
    splits = DataSplits(train=train, query=union("query", test_transform), gallery=union("gallery", test_transform),
                        class_names=class_names)
    if train is not None:
        ids, labels = np.unique(train.labels, return_inverse=True)
        train.labels, splits.train_class_ids = labels.astype(np.int64), ids.astype(np.int64)
    return splits
