# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""dsa-jax: DeepSeek Sparse Attention (DeepSeek-V3.2-Exp) in JAX/Flax NNX with Pallas kernels."""

import setuptools

setuptools.setup(
  name="dsa-jax",
  version="0.1.0",
  description="DeepSeek Sparse Attention (DSA) research framework in JAX/Flax NNX with Pallas kernels",
  long_description=open("README.md").read(),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["dsa_jax", "dsa_jax.*", "pallas_kernels", "pallas_kernels.*"]),
  python_requires=">=3.12",
  install_requires=[
    "jax==0.11.2",
    "flax>=0.12.10,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.4",
    "ml_dtypes",
    "absl-py",
    "ml-collections",
    "numpy",
    "safetensors",
    "tqdm",
  ],
  extras_require={
    "test": [
      "pytest",
      "pytest-xdist",
      "hypothesis",
      "ruff",
      "tensorboardX",
      "matplotlib",
      "nbclient",
      "nbformat",
      "ipykernel",
    ],
    "gpu": ["jax[cuda13]==0.11.2"],
    "tpu": ["jax[tpu]==0.11.2"],
    "torch_ref": ["torch", "transformers>=5.0"],
  },
)
