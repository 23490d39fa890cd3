"""Image bytes or files -> the model's input array, with numpy and Pillow only (no PyTorch).

The test-time pipeline of a trained model is defined once, in :mod:`deepmetric.core.preprocessing`
(:class:`Preprocessing`, rebuilt here from a checkpoint's config or an ONNX model's
``metadata_props``, see :mod:`deepmetric.inference.export`), and decoding once, in
:mod:`deepmetric.core.images`: evaluation during training, ``deepmetric eval``, ``embed``, the
server, the :class:`~deepmetric.inference.Predictor` and ONNX serving all use them. This module
names them for the inference layer.
"""
from __future__ import annotations

from ..core.images import ACCEPTED_FORMATS, FILE_MAX_PIXELS, ImageError, ImageTooLargeError, NotAnImageError
from ..core.preprocessing import (MIN_MAX_PIXELS, PIXELS_PER_INPUT_PIXEL, REDUCING_GAP, UNSIZED_MAX_PIXELS,
                                  Preprocessing, default_max_pixels)

__all__ = ["ACCEPTED_FORMATS", "FILE_MAX_PIXELS", "MIN_MAX_PIXELS", "PIXELS_PER_INPUT_PIXEL", "REDUCING_GAP",
           "UNSIZED_MAX_PIXELS", "ImageError", "ImageTooLargeError", "NotAnImageError", "Preprocessing",
           "default_max_pixels"]
