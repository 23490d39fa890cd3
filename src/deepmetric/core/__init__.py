"""The bottom layer: what every other part of deepmetric may use, using none of them.

- :mod:`~deepmetric.core.errors`: :class:`UserError` (bad input, one line at the CLI) and
  :class:`ParameterError` (a component's bad argument, named by parameter, never by recipe key);
- :mod:`~deepmetric.core.registry`: name -> constructor catalogues;
- :mod:`~deepmetric.core.files`: the one atomic file write (fsync, umask);
- :mod:`~deepmetric.core.lazy`: package attributes imported on first use;
- :mod:`~deepmetric.core.distributed`: ranks, collectives and devices under ``torchrun``;
- :mod:`~deepmetric.core.embeddings` and :mod:`~deepmetric.core.results`: the objects handed between
  stages (:class:`EmbeddingSet`, :class:`RetrievalResults`, :class:`EvalResult`).

Importing this package imports nothing else; only ``distributed`` and ``embeddings`` need PyTorch.
"""

__version__ = "0.1.0"
