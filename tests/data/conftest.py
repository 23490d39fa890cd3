"""Miniature datasets in each official layout, generated once per session (read-only for tests;
tests that damage a layout generate their own copy under ``tmp_path``)."""
from __future__ import annotations

import pytest

from deepmetric.data import synthetic


@pytest.fixture(scope="session")
def mini(tmp_path_factory):
    base = tmp_path_factory.mktemp("mini")
    return {
        "image_folder": synthetic.make_image_folder(base / "folder", n_classes=6, per_class=4),
        "csv": synthetic.make_csv(base / "csv", n_classes=6, per_class=4, split=None, string_labels=True),
        "csv_test": synthetic.make_csv(base / "csv_test", n_classes=6, per_class=3, split="test", camera=True),
        "csv_qg": synthetic.make_csv(base / "csv_qg", n_classes=6, per_class=3, split="query_gallery"),
        "sop": synthetic.make_sop(base / "sop", n_classes=8, per_class=3, n_super_classes=2),
        "cub": synthetic.make_cub(base / "cub", n_classes=6, per_class=3),
        "cars": synthetic.make_cars(base / "cars", n_classes=6, per_class=3),
        "inshop": synthetic.make_inshop(base / "inshop", n_items=8, per_item=4),
        "lfw": synthetic.make_lfw(base / "lfw", n_people=6, per_person=3, n_sets=2, pairs_per_set=3),
        "market": synthetic.make_market(base / "market", n_ids=8, per_id=4, n_distractors=2, n_junk=2),
        "duke": synthetic.make_market(base / "duke", n_ids=6, per_id=3, n_cams=8, style="duke"),
    }
