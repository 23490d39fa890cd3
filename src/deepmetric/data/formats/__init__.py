"""On-disk dataset layouts, one module each, catalogued in :data:`DATASETS` by name.

Every builder has the signature ``build(root, *, train_transform=None, test_transform=None,
**options) -> DataSplits`` and raises :class:`~deepmetric.data.base.DataError` with a one-line
message naming the path and what was expected. A builder's module is imported when its name is
first looked up.
"""
from __future__ import annotations

from ...core.registry import Registry


def concat(root=None, *, train_transform=None, test_transform=None, parts=()):
    """``concat``: several formats in one run (:mod:`.concat`), each part built from this catalogue
    (handed to it, so that ``concat.py`` needs no import of this package)."""
    from .concat import build_concat

    return build_concat(root, train_transform=train_transform, test_transform=test_transform, parts=parts,
                        formats=DATASETS)


#: every format by name (aliases included): ``name -> "module:builder"``
DATASETS = Registry("dataset", {
    "digits": "deepmetric.data.formats.arrays:digits",
    "fashion_mnist": "deepmetric.data.formats.arrays:fashion_mnist",
    "cars": "deepmetric.data.formats.cars:build_cars",
    "cars196": "deepmetric.data.formats.cars:build_cars",
    "concat": concat,
    "csv": "deepmetric.data.formats.csv_list:build_csv",
    "cub": "deepmetric.data.formats.cub:build_cub",
    "cub200": "deepmetric.data.formats.cub:build_cub",
    "image_folder": "deepmetric.data.formats.folder:build_image_folder",
    "list": "deepmetric.data.formats.list_file:build_list",
    "identity_folder": "deepmetric.data.formats.folder:build_identity_folder",
    "glyphs": "deepmetric.data.formats.glyphs:build_glyphs",
    "inshop": "deepmetric.data.formats.inshop:build_inshop",
    "in_shop": "deepmetric.data.formats.inshop:build_inshop",
    "lfw": "deepmetric.data.formats.lfw:build_lfw",
    "market1501": "deepmetric.data.formats.reid:build_market1501",
    "market": "deepmetric.data.formats.reid:build_market1501",
    "dukemtmc": "deepmetric.data.formats.reid:build_dukemtmc",
    "dukemtmc_reid": "deepmetric.data.formats.reid:build_dukemtmc",
    "duke": "deepmetric.data.formats.reid:build_dukemtmc",
    "sop": "deepmetric.data.formats.sop:build_sop",
    "stanford_online_products": "deepmetric.data.formats.sop:build_sop",
})

__all__ = ["DATASETS"]
