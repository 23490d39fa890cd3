"""The engine composes the components into runs.

- :mod:`~deepmetric.engine.build`: a validated recipe to data, model, losses, optimizers (and the one
  mapping of components' parameters to recipe keys); :func:`~deepmetric.engine.build.load_for_inference`;
- :mod:`~deepmetric.engine.checkpoint`: the checkpoint folder's format, written atomically;
- :mod:`~deepmetric.engine.extract`: a model and a dataset to an ``EmbeddingSet``;
- :mod:`~deepmetric.engine.evaluator`: a recipe's evaluation protocol on a model;
- :mod:`~deepmetric.engine.trainer`: the training loop (with :mod:`.schedule` and :mod:`.interrupt`;
  :mod:`.python_objects` for a model, loss or training set given in Python; :mod:`.callbacks` and
  :mod:`.tracking` for code of one's own and MLflow);
- :mod:`~deepmetric.engine.runs`: what ``deepmetric train`` and ``deepmetric eval`` do;
- :mod:`~deepmetric.engine.tune`: ``deepmetric tune``, an Optuna search over :mod:`.tune_space`.
"""
