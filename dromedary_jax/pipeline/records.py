"""Resumable, append-only JSONL records for pipeline stages.

Layout of one stage's folder (``<workdir>/<stage>/``)::

    config.json                          the config fingerprint + hash the records were made with
    <name>-<process>-of-<n>.jsonl        append-only shards, one record per line, each with an "id"
    <derived>.jsonl / funnel.md / ...    outputs re-derived from the shards (rewritten atomically)
    manifest.json                        written once (process 0) when the stage is done

Rules: a rerun skips ids already present in ANY shard of a name (so a restart with a different
host count still resumes); a line cut short by a kill is dropped on the next open; every batch is
flushed (and fsync'ed) before the next one starts, so a kill loses at most the batch in flight.
Outputs of a different config are refused unless ``overwrite`` (start that stage over) or
``force`` (append anyway) is set; a folder with no outputs yet (no written shard, manifest or
fine-tune checkpoint) does not lock. The hash covers only what changes a stage's outputs (see
``model_fingerprint`` / ``finetune_fingerprint``). A full disk (ENOSPC/EDQUOT) is a UserError.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from typing import Any, Iterable, Mapping

from dromedary_jax.distributed import Hosts
from dromedary_jax.errors import DISK_FULL, UserError, disk_full_error
from dromedary_jax.jsonl import (read_json, read_log, repair_tail, write_json_atomic,  # noqa: F401
                                 write_jsonl_atomic)

_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.jsonl$")
NON_SEMANTIC_KEYS = frozenset({"batch_size", "delay_s", "overwrite", "force", "progress"})
# config.model keys that do not change what a sampling stage generates (memory/speed), beyond the
# NON_SEMANTIC_KEYS every fingerprint drops (batch_size, progress, delay_s, ...)
MODEL_BOOKKEEPING_KEYS = frozenset({"remat", "mesh", "engine"})
# fine-tune section keys (dotted paths) that do not change the trained weights: checkpoint and
# eval/metrics intervals, progress, the device mesh, where/how the prepared dataset is read
FINETUNE_BOOKKEEPING_KEYS = ("checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
                             "eval.every_steps", "metrics", "debug", "mesh", "data.prepared_dir",
                             "data.prepare_timeout_s", "data.read_threads")


# ------------------------------------------------------------------------------------ hashing

def strip_non_semantic(obj: Any) -> Any:
    """Drop keys that do not change results (batch sizes, delays, overwrite flags) recursively."""
    if isinstance(obj, Mapping):
        return {k: strip_non_semantic(v) for k, v in obj.items() if k not in NON_SEMANTIC_KEYS}
    if isinstance(obj, (list, tuple)):
        return [strip_non_semantic(v) for v in obj]
    return obj


def model_fingerprint(model_cfg) -> dict:
    """What of ``config.model`` changes a sampling stage's generations (not remat, mesh, progress,
    batch size or the scripted model's delay)."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return strip_non_semantic({k: v for k, v in d.items() if k not in MODEL_BOOKKEEPING_KEYS})


def finetune_fingerprint(train_cfg) -> dict:
    """A fine-tune section without the keys that do not change the trained weights
    (:data:`FINETUNE_BOOKKEEPING_KEYS`)."""
    d = json.loads(json.dumps(train_cfg.to_dict() if hasattr(train_cfg, "to_dict") else dict(train_cfg),
                              default=str))
    for dotted in FINETUNE_BOOKKEEPING_KEYS:
        *parents, last = dotted.split(".")
        node = d
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return d


def config_hash(fingerprint: Any) -> str:
    """16 hex characters (the first 64 bits of SHA-256) of ``fingerprint`` as canonical JSON
    (sorted keys, ASCII, non-JSON values as ``str``): equal fingerprints give equal hashes."""
    blob = json.dumps(fingerprint, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of nested mappings (lists and other values are leaves)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _short(v: Any, width: int = 60) -> str:
    text = json.dumps(v, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


_ABSENT = object()


def config_changes(old: Any, new: Any) -> list[str]:
    """The differences between two config fingerprints, one ``"key: old -> new"`` string per
    changed dotted key (sorted; ``(absent)`` for a key only one side has; values as JSON, long
    ones cut). Both sides go through JSON first, so a tuple equals the list it was stored as."""
    a = _flatten(json.loads(json.dumps(old, default=str)))
    b = _flatten(json.loads(json.dumps(new, default=str)))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, _ABSENT) != b.get(k, _ABSENT):
            left = _short(a[k]) if k in a else "(absent)"
            right = _short(b[k]) if k in b else "(absent)"
            out.append(f"{k}: {left} -> {right}")
    return out


MAX_LISTED_CHANGES = 8


def describe_changes(old: Any, new: Any) -> str:
    """One line naming what changed between two fingerprints (at most
    :data:`MAX_LISTED_CHANGES` keys, then how many more); ``old`` None: the keys are unknown."""
    if old is None:
        return ("changed keys unknown: this folder was written by an older version that did not "
                "record its config")
    changes = config_changes(old, new)
    if not changes:
        return "changed keys unknown: the recorded config matches this one"
    more = len(changes) - MAX_LISTED_CHANGES
    listed = "; ".join(changes[:MAX_LISTED_CHANGES]) + (f"; and {more} more" if more > 0 else "")
    return f"changed: {listed}"


def text_digest(text: str) -> str:
    """16 hex characters (the first 64 bits of SHA-256 of the UTF-8 bytes) identifying ``text``,
    e.g. a rendered prompt in a fingerprint."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stable_int(key: str, bits: int = 31) -> int:
    """A stable non-negative int for a string id (per-id seeds, sampler ids)."""
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << bits) - 1)


# ------------------------------------------------------------------------------------ shards

def shard_path(stage_dir: str, name: str, index: int, count: int) -> str:
    """``<stage_dir>/<name>-<index>-of-<count>.jsonl`` (both numbers 5 digits, zero-padded): the
    shard of process ``index`` of ``count``."""
    return os.path.join(stage_dir, f"{name}-{index:05d}-of-{count:05d}.jsonl")


def shard_paths(stage_dir: str, name: str) -> list[str]:
    """Every existing shard of ``name`` in ``stage_dir`` (any process count), sorted by path;
    shards of other names that share the prefix are not included."""
    out = []
    for p in sorted(glob.glob(os.path.join(glob.escape(stage_dir), f"{glob.escape(name)}-*-of-*.jsonl"))):
        m = _SHARD_RE.match(os.path.basename(p))
        if m and m.group("name") == name:
            out.append(p)
    return out


def _read_lines(path: str) -> Iterable[dict]:
    return read_log(path)  # a line cut short by a kill is ignored and repaired on the next append


def read_shards(stage_dir: str, name: str) -> list[dict]:
    """All records of ``name`` from every shard, one per id (first wins), sorted by id."""
    seen: dict[str, dict] = {}
    for path in shard_paths(stage_dir, name):
        for rec in _read_lines(path):
            seen.setdefault(str(rec["id"]), rec)
    return [seen[k] for k in sorted(seen)]


class ShardWriter:
    """Appends records to this host's shard of ``name``; ``done`` holds the ids of every shard."""

    def __init__(self, stage_dir: str, name: str, hosts: Hosts, fsync: bool = True):
        self.path = shard_path(stage_dir, name, hosts.index, hosts.count)
        self.name, self.stage_dir, self.fsync = name, stage_dir, fsync
        os.makedirs(stage_dir, exist_ok=True)
        self._repair()
        self.done: set[str] = {r["id"] for r in read_shards(stage_dir, name)}
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        """Drop a trailing partial line left by a kill."""
        repair_tail(self.path)

    def append(self, records: Iterable[dict]) -> None:
        """Write one batch of records and flush it to disk; skips ids already present."""
        lines = []
        for rec in records:
            rid = str(rec["id"])
            if rid in self.done:
                continue
            self.done.add(rid)
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if lines:
            try:
                self._f.write("".join(lines))
                self._f.flush()
                if self.fsync:
                    os.fsync(self._f.fileno())
            except OSError as e:
                if e.errno not in DISK_FULL:
                    raise
                try:  # the unwritten rest of the batch is dropped; a cut line is repaired on resume
                    self._f.close()
                except OSError:
                    pass
                raise disk_full_error(self.path, e, "writing records") from None

    def close(self) -> None:
        """Close this host's shard file (every batch was already flushed by :meth:`append`)."""
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Atomic writers (write_json_atomic, write_jsonl_atomic) live in dromedary_jax.jsonl.

def read_jsonl(path: str) -> list[dict]:
    """The records of one JSONL file the pipeline wrote ([] when it does not exist): blank lines
    skipped, a cut last line ignored, any other bad line a UserError naming file and line."""
    return list(_read_lines(path))


# ------------------------------------------------------------------------------------ stage folder

class StageDir:
    """One stage's output folder: config lock, shards, derived files, manifest."""

    def __init__(self, workdir: str, stage: str, fingerprint: Any, hosts: Hosts = Hosts(),
                 overwrite: bool = False, force: bool = False):
        """``fingerprint``: what changes the stage's results (JSON-able); its
        :func:`config_hash` locks the folder. ``overwrite``: a folder of another config is
        started over; ``force``: appended to anyway (else :meth:`open` refuses it)."""
        self.path = os.path.join(workdir, stage)
        self.stage, self.hosts = stage, hosts
        self.fingerprint = fingerprint
        self.hash = config_hash(fingerprint)
        self.overwrite, self.force = bool(overwrite), bool(force)

    # -- lock
    def _lock_path(self) -> str:
        return os.path.join(self.path, "config.json")

    def stored_hash(self) -> str | None:
        """The config hash recorded in this folder's ``config.json``, or None when there is none
        (UserError when that file is not a JSON object)."""
        p = self._lock_path()
        if not os.path.exists(p):
            return None
        return _read_object(p).get("config_hash")

    def stored_fingerprint(self, stored_hash: str | None = None) -> Any:
        """The config fingerprint this folder's outputs were made with, as recorded in its
        ``config.json`` (else its manifest), or None when neither recorded one (older
        versions). With ``stored_hash``, only a fingerprint recorded under that hash counts."""
        sources = []
        if os.path.exists(self._lock_path()):
            sources.append(_read_object(self._lock_path()))
        m = self.manifest()
        if m:
            sources.append(m)
        for src in sources:
            fp = src.get("fingerprint")
            if fp is not None and (stored_hash is None or src.get("config_hash") == stored_hash):
                return fp
        return None

    def changes_from_stored(self) -> list[str]:
        """``"key: old -> new"`` for each key of the current fingerprint that differs from the
        recorded one ([] when none is recorded or nothing differs)."""
        old = self.stored_fingerprint()
        return [] if old is None else config_changes(old, self.fingerprint)

    def open(self) -> "StageDir":
        """Check the config lock (refuse a different config unless overwrite/force) and write it."""
        old = self.stored_hash()
        if old is not None and old != self.hash and not self.has_outputs():
            old = None  # nothing was written under the old config (e.g. its model failed to load)
        if old is not None and old != self.hash:
            if self.overwrite:
                if self.hosts.is_main:
                    shutil.rmtree(self.path)
            elif not self.force:
                raise UserError(
                    f"{self.path}: outputs were written by a different config (hash {old}, now "
                    f"{self.hash}; {describe_changes(self.stored_fingerprint(old), self.fingerprint)}"
                    f"); use another --workdir, or pass --config.overwrite=True to start "
                    f"this stage over, or --config.force=True to append to them anyway")
        self.hosts.barrier(f"{self.stage}-lock-check")
        if self.hosts.is_main:
            os.makedirs(self.path, exist_ok=True)
            if old != self.hash or self.overwrite:
                write_json_atomic(self._lock_path(), {"config_hash": self.hash, "stage": self.stage,
                                                      "fingerprint": self.fingerprint})
        self.hosts.barrier(f"{self.stage}-lock-written")
        os.makedirs(self.path, exist_ok=True)
        return self

    def has_outputs(self) -> bool:
        """Whether the folder holds results a config change would invalidate: record shards, a
        manifest or fine-tune checkpoints (derived files are re-made on every run)."""
        if not os.path.isdir(self.path):
            return False
        if os.path.exists(self.file("manifest.json")):
            return True
        for f in os.listdir(self.path):  # a shard opened but never written to does not count
            if _SHARD_RE.match(f) and os.path.getsize(os.path.join(self.path, f)) > 0:
                return True
        ckpt = os.path.join(self.path, "train", "checkpoints")
        return os.path.isdir(ckpt) and bool(os.listdir(ckpt))

    # -- records
    def writer(self, name: str) -> ShardWriter:
        """A :class:`ShardWriter` appending to this host's shard of ``name`` (opens the file)."""
        return ShardWriter(self.path, name, self.hosts)

    def records(self, name: str) -> list[dict]:
        """Every record of ``name`` from all shards, one per id, sorted by id
        (:func:`read_shards`)."""
        return read_shards(self.path, name)

    def file(self, name: str) -> str:
        """The path of file ``name`` in this folder (it need not exist)."""
        return os.path.join(self.path, name)

    # -- manifest
    def manifest(self) -> dict | None:
        """This folder's ``manifest.json`` (any config), or None when the stage has not finished;
        UserError when the file is not a JSON object."""
        p = self.file("manifest.json")
        if not os.path.exists(p):
            return None
        return _read_object(p)

    def is_done(self) -> bool:
        """Whether the manifest says the stage finished under this folder's config hash."""
        m = self.manifest()
        return bool(m and m.get("done") and m.get("config_hash") == self.hash)

    def write_manifest(self, counts: Mapping[str, Any], outputs: Mapping[str, str]) -> None:
        """Process 0 writes the manifest after every host has finished (barrier first)."""
        self.hosts.barrier(f"{self.stage}-finished")
        if self.hosts.is_main:
            write_json_atomic(self.file("manifest.json"), {
                "stage": self.stage, "done": True, "config_hash": self.hash,
                "fingerprint": self.fingerprint, "num_processes": self.hosts.count,
                "counts": dict(counts), "outputs": dict(outputs)})
        self.hosts.barrier(f"{self.stage}-manifest")


def stage_done(workdir: str, stage: str, expected_hash: str | None = None) -> dict | None:
    """The manifest of a finished stage, or None; with ``expected_hash``, None also when the stage
    was finished under a different config (a run would refuse it, not skip it)."""
    p = os.path.join(workdir, stage, "manifest.json")
    if not os.path.exists(p):
        return None
    m = _read_object(p)
    if not m.get("done"):
        return None
    if expected_hash is not None and m.get("config_hash") != expected_hash:
        return None
    return m


def _read_object(path: str) -> dict:
    """A JSON object this project wrote (a manifest, a config lock); a UserError naming the file
    if it is not one (these files are replaced atomically, so only an outside edit breaks them)."""
    obj = read_json(path, " (delete it and rerun: the stage is redone or re-checked)")
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__} (delete it "
                        f"and rerun)")
    return obj
