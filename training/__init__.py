"""SSMTL two-tower training with TensorFlow Recommenders: inputs, tower, losses, evaluation, export.

TFRS 0.7.7 needs Keras 2 (tf-keras); TensorFlow reads TF_USE_LEGACY_KERAS at its first import, so
it is set here, once, before any module of this package imports TensorFlow.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
