"""Test-session setup: 8 fake CPU devices and a persistent compilation cache (both set before
JAX is imported) and shared fixtures.

The compilation cache: the tests compile the same tiny programs many times over (every run of the
smoke pipeline, every resumed fine-tune, in this process and in the subprocesses the tests start,
which inherit the environment), and on 2 CPU cores compiling is most of their time. JAX keys an
entry by the program, the devices, the compile options and the jax/XLA versions and loads the very
executable it compiled, so results are bit-for-bit those of a fresh compile. The cache lives in a
temporary folder removed when the session ends (a session killed by a signal leaves it in the
system's temporary folder); a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is (kept,
so a rerun of the suite starts warm).
"""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="dromedary_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program
# A program with oneDNN dots (forward_jit) cannot be stored: JAX warns and compiles it each time.
# The subprocesses of the tests must not print that warning (some read stderr line by line);
# pytest.ini ignores it in this process.
_NOT_STORED = "ignore:Error writing persistent compilation cache entry:UserWarning"
if _NOT_STORED not in os.environ.get("PYTHONWARNINGS", ""):
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), _NOT_STORED) if w)
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

# fixtures that run the whole pipeline (tens of seconds on 2 CPU cores): a test using one is slow
SLOW_FIXTURES = ("smoke_run",)


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that uses a fixture of :data:`SLOW_FIXTURES` (``make test`` runs
    them all; ``-m "not slow"`` leaves them out)."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)


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
