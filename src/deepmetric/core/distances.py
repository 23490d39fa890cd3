"""The distances embeddings are compared by, by name: the one vocabulary of losses, metrics and search.

``cosine`` is ``1 - cos(a, b)``, ``euclidean`` the L2 distance, ``squared_euclidean`` its square.
"""

DISTANCES = ("cosine", "euclidean", "squared_euclidean")
