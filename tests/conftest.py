"""Test-session setup: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "dromedary")


@pytest.fixture(scope="session")
def reference_dir():
    """The original Dromedary files (CC BY-NC 4.0; read-only, never copied). Skips if absent."""
    path = os.path.abspath(REFERENCE_DIR)
    if not os.path.isdir(path):
        pytest.skip("shared/reference/dromedary is not present")
    return path


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """A tiny SentencePiece .model (vocab 256, bos=1, eos=2), trained once per session."""
    from helpers import train_tiny_sentencepiece

    return train_tiny_sentencepiece(str(tmp_path_factory.mktemp("spm") / "tiny"), vocab_size=256)


@pytest.fixture(scope="session")
def llama_sp_model_path(tmp_path_factory):
    """A tiny LLaMA-style SentencePiece .model (vocab 400: dummy prefix, byte fallback, no
    whitespace normalisation), trained once per session."""
    from helpers import train_tiny_sentencepiece

    return train_tiny_sentencepiece(str(tmp_path_factory.mktemp("spm_llama") / "llama"),
                                    vocab_size=400, llama_style=True)


@pytest.fixture(scope="session")
def llama_sp_tokenizer(llama_sp_model_path):
    from dromedary_jax.tokenizer import load_tokenizer

    return load_tokenizer(llama_sp_model_path)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path):
    from dromedary_jax.tokenizer import load_tokenizer

    return load_tokenizer(sp_model_path)
