"""Overhead of the TensorFlow gradient bridge per optimisation step.

Compares, on the same Keras model and batch, the time of one step (forward + input gradient of
``sum(logits * w)``):

- ``keras-graph``: TensorFlow alone, forward and gradient in one ``tf.function`` (the fastest a Keras
  user gets);
- ``tf-tape``: TensorFlow alone, an eager ``GradientTape`` held around a ``tf.function`` forward and
  asked for the gradient later: what a bridge that keeps the tape between torch's forward and
  backward would cost (leapcore's bridge recomputes the forward in its backward graph instead);
- ``bridge``: leapcore's path: torch NCHW pixels -> ``keras_logits_model`` -> torch ``backward()``.

The cases run interleaved, step by step, so that load from other processes hits them alike; the
minimum is the least noisy figure on a shared machine.

Run: ``.venv/bin/python benchmarks/tf_bridge.py [--steps 30] [--batch 1 8] [--threads 1]``. Prints a table and one
JSON line per case. Models: a small digits CNN (16x16x1) where fixed costs dominate, and MobileNetV2
(224x224x3, random weights, nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def small_cnn():
    import keras

    return keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def mobilenet():
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), weights=None, classes=1000, classifier_activation=None
    )


def timed(cases: dict, steps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Run every case once per step, in turn; wall seconds per case."""
    for step in cases.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(steps):
        for name, step in cases.items():
            began = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - began)
    return times


def bench(name: str, model, batch: int, steps: int) -> list[dict]:
    import tensorflow as tf

    from leapcore.frameworks.tensorflow import keras_logits_model

    _, h, w, c = model.inputs[0].shape
    k = model.outputs[0].shape[-1]
    rng = np.random.default_rng(0)
    images = rng.random((batch, h, w, c), dtype=np.float32)
    weights = rng.standard_normal((batch, k)).astype(np.float32)

    x_tf, w_tf = tf.constant(images), tf.constant(weights)

    @tf.function
    def graph_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=False) * w_tf)
        return tape.gradient(loss, x)

    forward = tf.function(lambda x: model(x, training=False))

    def tape_step():
        with tf.GradientTape() as tape:
            tape.watch(x_tf)
            loss = tf.reduce_sum(forward(x_tf) * w_tf)
        return tape.gradient(loss, x_tf).numpy()

    bridged = keras_logits_model(model, k)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    w_torch = torch.from_numpy(weights)

    def bridge_step():
        x = pixels.clone().requires_grad_(True)
        (bridged(x) * w_torch).sum().backward()
        return x.grad

    # the three paths compute the same gradient
    expected = graph_step(x_tf).numpy()
    np.testing.assert_allclose(
        bridge_step().permute(0, 2, 3, 1).numpy(), expected, rtol=1e-3, atol=1e-5
    )

    cases = {
        "keras-graph": lambda: graph_step(x_tf).numpy(),
        "tf-tape": tape_step,
        "bridge": bridge_step,
    }
    rows = [
        {
            "model": name,
            "batch": batch,
            "case": case,
            "median_ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times),
            "steps": steps,
        }
        for case, times in timed(cases, steps).items()
    ]
    base = rows[0]["min_ms"]
    for row in rows:
        row["overhead_ms"] = row["min_ms"] - base
        row["overhead_pct"] = 100 * (row["min_ms"] / base - 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "mobilenet_v2"])
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for TF and torch (1: less noise)"
    )
    args = parser.parse_args()
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    builders = {"small_cnn": small_cnn, "mobilenet_v2": mobilenet}
    print(
        f"tensorflow {tf.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"GPUs visible to TF: {len(tf.config.list_physical_devices('GPU'))}, "
        f"threads: {args.threads or 'default'}"
    )
    print(
        f"{'model':<14}{'batch':>6}  {'case':<12}{'median ms':>10}{'min ms':>9}{'overhead (min)':>18}"
    )
    for name in args.models:
        model = builders[name]()
        for batch in args.batch:
            steps = args.steps if name == "small_cnn" else max(5, args.steps // 3)
            for row in bench(name, model, batch, steps):
                print(
                    f"{row['model']:<14}{row['batch']:>6}  {row['case']:<12}{row['median_ms']:>10.2f}"
                    f"{row['min_ms']:>9.2f}{row['overhead_ms']:>+9.2f} ms {row['overhead_pct']:>+5.0f}%"
                )
                print("JSON", json.dumps(row))


if __name__ == "__main__":
    main()
