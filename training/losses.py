"""The two self-supervised objectives of SSMTL (PAPER.md), as plain TensorFlow functions."""

from __future__ import annotations

import tensorflow as tf


def standardise_columns(z: tf.Tensor, eps: float = 1e-8) -> tf.Tensor:
    """Zero mean, unit (population) std per embedding column over the M users."""
    mean = tf.reduce_mean(z, axis=0, keepdims=True)
    std = tf.math.reduce_std(z, axis=0, keepdims=True)
    return (z - mean) / (std + eps)


def cca_ssg_loss(z_a: tf.Tensor, z_b: tf.Tensor, lambd: float) -> tf.Tensor:
    """CCA-SSG: -trace(C) + lambda (||I - C_A||_F^2 + ||I - C_B||_F^2) on standardised views.

    The invariance term pulls the two views of a user together; the decorrelation terms keep the
    embedding dimensions from collapsing onto each other (no negatives needed).
    """
    m = tf.cast(tf.shape(z_a)[0], z_a.dtype)
    a = standardise_columns(z_a)
    b = standardise_columns(z_b)
    c = tf.matmul(a, b, transpose_a=True) / m
    c_a = tf.matmul(a, a, transpose_a=True) / m
    c_b = tf.matmul(b, b, transpose_a=True) / m
    eye = tf.eye(tf.shape(c)[0], dtype=z_a.dtype)
    decorrelation = tf.reduce_sum(tf.square(eye - c_a)) + tf.reduce_sum(tf.square(eye - c_b))
    return -tf.linalg.trace(c) + lambd * decorrelation


def scaled_cosine_error(x_hat: tf.Tensor, x: tf.Tensor, gamma: float) -> tf.Tensor:
    """GraphMAE's SCE: mean over rows of (1 - cos(x_hat, x)) ** gamma (gamma >= 1 focuses on
    the hard, badly reconstructed users)."""
    cos = tf.reduce_sum(
        tf.math.l2_normalize(x_hat, axis=-1) * tf.math.l2_normalize(x, axis=-1), axis=-1
    )
    return tf.reduce_mean(tf.pow(1.0 - cos, gamma))
