"""On-disk dataset layouts, one module each; importing this package registers them in ``DATASETS``.

Every builder has the signature ``build(root, *, train_transform=None, test_transform=None,
**options) -> DataSplits`` and raises :class:`~deepmetric.data.base.DataError` with a one-line
message naming the path and what was expected.
"""
from __future__ import annotations

from . import arrays, cars, csv_list, cub, folder, glyphs, inshop, lfw, reid, sop  # noqa: F401  (registration)
