"""Installs psipo_jax: `pip install -e .` (add `[test]` for the test tools)."""

import setuptools

setuptools.setup(
  name="psipo_jax",
  version="0.1.0",
  description=(
    "ΨPO-family preference optimisation (IPO, DPO and relatives) in"
    " JAX/Flax, after Azar et al., arXiv:2310.12036."
  ),
  packages=setuptools.find_packages(include=["psipo_jax", "psipo_jax.*"]),
  python_requires=">=3.10",
  install_requires=[
    "jax",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "grain",
    "chex",
    "ml-collections",
    "absl-py",
    "numpy",
    "matplotlib",
    "tqdm",
    "tensorboardX",  # TensorBoard event files without TensorFlow
    # tensorflow-datasets 4.9 imports it when preparing a dataset but
    # declares it only for Python < 3.9 (tensorflow/datasets#11212).
    "importlib_resources",
  ],
  extras_require={
    # ruff pinned: another version may format differently (.ci/run checks).
    "test": [
      "pytest",
      "pytest-xdist",
      "sentencepiece",
      "tokenizers",
      "ruff==0.17.6",
      # Hugging Face checkpoint tests build tiny models with transformers.
      # torch pinned: 2.13.0 is the CPU wheel cached on CI's machine kind
      # (any other spec downloads a multi-GB CUDA build).
      "torch==2.13.0",
      "transformers",
      "jinja2>=3.1.6",
    ],
    "tokenizers": ["sentencepiece", "tokenizers"],
    # gs:// workdirs and data through etils.epath (psipo_jax/storage.py).
    "gcs": ["gcsfs"],
    # Hugging Face model directories: tokenizer.json and the chat template
    # (jinja2 >= 3.1.6, the version transformers requires for its sandbox).
    "hf": ["tokenizers", "jinja2>=3.1.6"],
  },
)
