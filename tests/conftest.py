"""Test session set-up: 8 fake CPU devices so sharded and single-device runs share one process."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MUJOCO_GL", "egl")
# TensorFlow (tf.data) must never claim an accelerator that JAX wants.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
