"""The base class of every loss term: what the trainer needs to know to feed it, as typed attributes."""
from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

Kind = Literal["pair", "classification"]


class Loss(nn.Module):
    """A loss term. Subclasses set ``kind``:

    - ``"pair"``: a loss of the batch against itself or a reference set (:class:`~.pairwise.PairLoss`,
      :class:`~.memory.CrossBatchMemory`); owns no class parameters;
    - ``"classification"``: owns a class matrix and is built with ``num_classes`` and ``embedding_dim``
      (:class:`~.classification.ClassificationLoss`, :class:`~.partial_fc.PartialFC`).

    ``gathers_inputs``: the loss all-gathers embeddings and labels across ranks itself (Partial FC), so
    the trainer gives it this rank's batch rather than the global one.
    """

    kind: ClassVar[Kind]
    gathers_inputs: ClassVar[bool] = False
