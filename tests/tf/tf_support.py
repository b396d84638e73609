"""The digits data set (upsampled to 16x16, channels last), a small Keras CNN, and an MLflow store."""

from __future__ import annotations

import numpy as np

DIGITS = [str(d) for d in range(10)]
SIZE = 16


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """``[N, 16, 16, 1]`` float32 in [0, 1] (channels last) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    images = np.kron(images, np.ones((1, 2, 2), dtype=np.float32))  # 8x8 -> 16x16
    return images[..., None], data.target.astype(np.int64)


def build_digit_cnn(softmax: bool = False):
    import keras

    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax" if softmax else None),
        ]
    )
