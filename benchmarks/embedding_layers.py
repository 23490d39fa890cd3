"""MAP@R of a trained run's embedding against its backbone's pooled features, on validation and test.

A diagnosis, not a selection: for each run folder (a ``config.yaml`` and ``checkpoints/best``, as
``deepmetric train`` and ``bench_suite.py`` write them) it embeds the validation split (where the run
has one) and the test split twice:

- ``embedding``: what the model gives for retrieval (the head's projection, L2-normalised): the vectors
  ``deepmetric eval`` and ``deepmetric embed`` score;
- ``pooled``: the backbone's globally pooled feature map, before the projection, L2-normalised.

On few training classes the projection can serve those classes more than the unseen ones; this shows
whether the features under it keep more, and whether validation sees what test sees::

    python benchmarks/embedding_layers.py /tmp/bench_suite_XXXX/fashion-0-auto
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from deepmetric.config import load_config
from deepmetric.engine.build import build_data, model_from_checkpoint
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.evaluation.retrieval import retrieval_metrics

LAYERS = ("embedding", "pooled")


@torch.no_grad()
def embed(model, dataset, batch_size: int = 256):
    """``{layer: (N, D) L2-normalised vectors}`` of ``dataset``'s images, and their labels."""
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in LAYERS}
    labels = []
    for images, y, *_ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        fmap = model.backbone(images)
        out["embedding"].append(model.head(fmap)["embedding"])
        out["pooled"].append(model.head.pool(fmap).flatten(1))
        labels.append(torch.as_tensor(y))
    return {k: F.normalize(torch.cat(v).float(), dim=1) for k, v in out.items()}, torch.cat(labels)


def score(model, split, distance: str) -> Dict[str, float]:
    """MAP@R of each layer on ``split`` (its gallery, or leave-one-out on its queries)."""
    q, q_labels = embed(model, split.query)
    g, g_labels = embed(model, split.gallery) if split.gallery is not None else ({k: None for k in q}, None)
    return {k: float(retrieval_metrics(q[k], q_labels, g[k], g_labels, ks=(1,), distance=distance)["map@r"])
            for k in q}


def layers_of_run(run: Path) -> Dict[str, object]:
    cfg = load_config(str(run / "config.yaml"), [])
    ckpt, state = read_checkpoint(run / "checkpoints" / "best")
    model = model_from_checkpoint(cfg, ckpt).eval()
    splits = build_data(cfg, validation=True)
    row: Dict[str, object] = {"run": str(run), "step": state.get("step")}
    if splits.val is not None:
        row["val"] = score(model, splits.val, cfg.eval.distance)
    row["test"] = score(model, splits, cfg.eval.distance)
    return row


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (config.yaml, checkpoints/best)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'run':48} {'step':>6}  val: embedding / pooled   test: embedding / pooled")
    for run in args.runs:
        row = layers_of_run(run)
        rows.append(row)
        val = row.get("val")
        shown = f"{val['embedding']:.4f} / {val['pooled']:.4f}" if val else "- / -"
        print(f"{run.parent.name + '/' + run.name:48} {row['step']!s:>6}  {shown:>22}   "
              f"{row['test']['embedding']:.4f} / {row['test']['pooled']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
