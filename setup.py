# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""dsa-jax: DeepSeek Sparse Attention (DeepSeek-V3.2-Exp) in JAX/Flax NNX with Pallas kernels."""

import os

import setuptools

_HERE = os.path.dirname(os.path.abspath(__file__))
_VIZ = ["matplotlib", "tensorboardX"]

setuptools.setup(
  name="dsa-jax",
  version="0.1.0",
  description="DeepSeek Sparse Attention (DSA) research framework in JAX/Flax NNX with Pallas kernels",
  long_description=open(os.path.join(_HERE, "README.md"), encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  # experiments (launchers, configs, benchmarks) is installed too, so the tools run from any
  # directory; its data is generated or read from the Python standard library (dsa_jax.data).
  packages=setuptools.find_packages(
    include=[
      "dsa_jax",
      "dsa_jax.*",
      "pallas_kernels",
      "pallas_kernels.*",
      "experiments",
      "experiments.*",
    ]
  ),
  package_data={"experiments": ["notebooks/*.ipynb"]},
  python_requires=">=3.12",
  install_requires=[
    "jax==0.11.2",
    "flax>=0.12.10,<0.13",
    "optax>=0.2.8",
    # convert/orbax_io.py writes Orbax's on-disk layout itself: tested with 0.12.x only.
    "orbax-checkpoint>=0.12.4,<0.13",
    "tensorstore",
    "ml_dtypes",
    "absl-py",
    "ml-collections",
    "numpy",
    "safetensors",
    "tqdm",
  ],
  extras_require={
    "gpu": ["jax[cuda13]==0.11.2"],
    "tpu": ["jax[tpu]==0.11.2"],
    "viz": _VIZ,  # demo/benchmark plots, TensorBoard scalars
    "data": ["tokenizers"],  # DataConfig(source="dir", tokenizer=...)
    "test": [
      "pytest",
      "pytest-xdist",
      "hypothesis",
      "ruff",
      "nbclient",
      "nbformat",
      "ipykernel",
      *_VIZ,
    ],
    "torch_ref": ["torch", "transformers>=5.0"],
  },
  entry_points={
    "console_scripts": [
      "dsa-train=experiments.cli:train",
      "dsa-convert=experiments.cli:convert",
      "dsa-generate=experiments.cli:generate",
      "dsa-bench=experiments.cli:bench",
      "dsa-demo=experiments.cli:demo",
    ]
  },
)
