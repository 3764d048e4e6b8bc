"""JSONL records -> a tensorflow-datasets ArrayRecord dataset -> deterministic, host-sharded,
checkpointable batches.

Preparation (once per distinct input): the records are read, rendered, tokenized and masked
(``examples.py``) and written with tensorflow-datasets (no TensorFlow needed) as an ArrayRecord
dataset with splits ``train`` and, when there are held-out files, ``validation``. Each example
stores ``tokens`` (int32), ``loss_mask`` (uint8), ``index`` (its position in the split) and
``id``. The dataset folder is named by a fingerprint of the input files' contents, the
tokenizer and every data setting, so a rerun (or a resumed run) reuses it and any change makes
a new one. Example lengths go to ``lengths-<split>.npy`` next to it.

Reading: ONE global example order (shuffled from ``data.seed``, a new order every epoch,
repeated ``data.num_epochs`` times) is packed into one global sequence of rows (``packing.py``);
step s trains on its next ``train.batch_size`` rows and each process reads only its own share of
them (:func:`row_plan`, :func:`host_rows`), so the batches do not depend on the process count.
:class:`BatchIterator` yields exactly ``num_batches`` host batches (the last ones padded with
empty rows); its state (JSON bytes, saved with the Orbax checkpoint via grain's checkpoint
handler) is the number of batches taken, so a restored iterator continues at the exact next one.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from dromedary_jax.errors import UserError
from dromedary_jax.jsonl import read_json, write_json_atomic
from dromedary_jax.training import examples as ex_lib
from dromedary_jax.training import packing

FORMAT_VERSION = 1
INFO_FILE = "sft_info.json"
TRAIN, VALIDATION = "train", "validation"


@dataclasses.dataclass
class PreparedData:
    """A prepared ArrayRecord dataset: its folder, fingerprint, example count per split
    (``train`` / ``validation``) and the preparation stats (examples, dropped, truncated and
    target tokens per split)."""

    path: str  # the tfds dataset folder (holds dataset_info.json, features.json, *.array_record*)
    fingerprint: str
    counts: dict[str, int]  # split -> examples
    stats: dict[str, Any]

    def lengths(self, split: str) -> np.ndarray:
        """Input lengths (tokens - 1) of the split's examples, in stored order."""
        return np.load(os.path.join(self.path, f"lengths-{split}.npy"))

    def source(self, split: str):
        """Random-access source of decoded examples (a tfds ArrayRecord data source)."""
        import tensorflow_datasets as tfds

        return tfds.builder_from_directory(self.path).as_data_source(split=split)


# ----------------------------------------------------------------------------- preparation
def _sha_file(h, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def fingerprint(data_cfg, tokenizer, train_files: Sequence[str], eval_files: Sequence[str]) -> str:
    """20 hex digits of sha256 over the data settings (fields, BOS/EOS, ``max_len``, the
    template), the format version, the tokenizer (its repr and file bytes) and each input
    file's name and bytes: the name of the dataset folder, so any change makes a new one.
    UserError when the template (file) is missing or lacks ``{prompt}``."""
    h = hashlib.sha256()
    settings = {k: data_cfg.get(k) for k in (
        "prompt_field", "response_field", "id_field", "add_bos", "add_eos", "max_len")}
    settings["template"] = ex_lib.load_template(data_cfg.template, data_cfg.get("template_file", ""))
    settings["version"] = FORMAT_VERSION
    settings["tokenizer"] = repr(tokenizer)
    h.update(json.dumps(settings, sort_keys=True).encode())
    tok_path = getattr(tokenizer, "path", None)
    if tok_path and os.path.isfile(tok_path):
        _sha_file(h, tok_path)
    for tag, files in (("train", train_files), ("eval", eval_files)):
        for path in files:
            h.update(f"{tag}:{os.path.basename(path)}".encode())
            _sha_file(h, path)
    return h.hexdigest()[:20]


def _tokenize_files(files, data_cfg, tokenizer, template, stats, split):
    out = []
    dropped = truncated = 0
    for rec in ex_lib.read_sft_records(files, data_cfg.prompt_field, data_cfg.response_field,
                                   data_cfg.id_field):
        ex = ex_lib.tokenize_example(
            tokenizer, ex_lib.render_prompt(template, rec.prompt), rec.response,
            data_cfg.max_len, add_bos=data_cfg.add_bos, add_eos=data_cfg.add_eos, id=rec.id)
        if ex is None:
            dropped += 1
            continue
        truncated += int(ex.truncated)
        out.append(ex)
    stats[split] = {"examples": len(out), "dropped_no_target": dropped, "truncated": truncated,
                    "target_tokens": int(sum(int(e.loss_mask[1:].sum()) for e in out)),
                    "files": list(files)}
    return out


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds

    class SftExamples(tfds.core.GeneratorBasedBuilder):
        """Tokenized SFT examples (tokens, loss mask, index, id)."""

        VERSION = tfds.core.Version("1.0.0")
        # The class is created at run time: tfds' package-resource lookups do not apply.
        code_path = None

        def __init__(self, *, splits: dict, **kw):
            self._splits = splits
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="dromedary_jax SFT examples: tokens, loss_mask (1 = target), index, id",
                features=tfds.features.FeaturesDict({
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "id": tfds.features.Text(),
                }),
                disable_shuffling=True,
            )

        def _log_download_bytes(self):  # tfds prints banners; we stay quiet
            pass

        def _log_download_done(self):
            pass

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(exs) for name, exs in self._splits.items()}

        def _generate_examples(self, exs):
            for i, e in enumerate(exs):
                yield i, {"tokens": e.tokens, "loss_mask": e.loss_mask.astype(np.uint8),
                          "index": i, "id": e.id}

    return SftExamples


def _write_tfds(root: str, splits: dict) -> str:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    builder = _builder_class()(splits=splits, data_dir=root, file_format="array_record")
    shown = tqdm_utils._active  # tfds' progress bars: off while we write, then as they were
    tfds.display_progress_bar(False)
    try:
        with tempfile.TemporaryDirectory() as dl:
            builder.download_and_prepare(
                download_dir=dl,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        tfds.display_progress_bar(shown)
    # disable_shuffling keeps generation order; the lengths files rely on it.
    for name, exs in splits.items():
        src = builder.as_data_source(split=name)
        for i in {0, len(exs) // 2, len(exs) - 1}:
            if int(src[i]["index"]) != i:
                raise RuntimeError(f"tfds stored split {name!r} out of generation order")
    return str(builder.data_dir)


def _wait_for(info_path: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Other hosts wait for process 0 to finish the dataset; a clear error instead of a hang."""
    start = time.monotonic()
    while not os.path.isfile(info_path):
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise UserError(
                f"waited {waited:.0f} s for process 0 to prepare the training data ({info_path} "
                f"never appeared): did process 0 fail, and is data.prepared_dir on a filesystem "
                f"every host shares? (data.prepare_timeout_s={timeout_s:g})")
        time.sleep(poll_s)


def prepare(data_cfg, tokenizer, train_files: Sequence[str], eval_files: Sequence[str],
            root: str, process_index: int = 0, process_count: int = 1) -> PreparedData:
    """Tokenize the JSONL files into an ArrayRecord dataset under ``root`` (reused if present).

    Only process 0 writes; the others wait for it (on a shared filesystem)."""
    fp = fingerprint(data_cfg, tokenizer, train_files, eval_files)
    final = os.path.join(root, fp)
    info_path = os.path.join(final, INFO_FILE)
    if process_index == 0 and not os.path.isfile(info_path):
        template = ex_lib.load_template(data_cfg.template, data_cfg.get("template_file", ""))
        stats: dict[str, Any] = {}
        train = _tokenize_files(train_files, data_cfg, tokenizer, template, stats, TRAIN)
        if not train:
            raise UserError(
                f"no training examples in {', '.join(train_files)} (files empty, or every "
                f"prompt is longer than data.max_len={data_cfg.max_len})")
        splits = {TRAIN: train}
        if eval_files:
            held = _tokenize_files(eval_files, data_cfg, tokenizer, template, stats, VALIDATION)
            if not held:
                raise UserError(f"no held-out examples in {', '.join(eval_files)}")
            splits[VALIDATION] = held
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{fp}-", dir=root)
        try:
            ds_dir = _write_tfds(tmp, splits)
            for name, exs in splits.items():
                np.save(os.path.join(ds_dir, f"lengths-{name}.npy"),
                        np.asarray([len(e.tokens) - 1 for e in exs], np.int32))
            info = {"fingerprint": fp, "format_version": FORMAT_VERSION,
                    "counts": {k: len(v) for k, v in splits.items()}, "stats": stats,
                    "max_len": int(data_cfg.max_len)}
            write_json_atomic(os.path.join(ds_dir, INFO_FILE), info, indent=1)
            if os.path.isdir(final):  # an unfinished earlier attempt
                shutil.rmtree(final)
            os.replace(ds_dir, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _wait_for(info_path, float(data_cfg.get("prepare_timeout_s", 3600)))
    info = read_json(info_path, " (a prepared dataset; delete its folder to prepare it again)")
    return PreparedData(path=final, fingerprint=fp, counts=info["counts"], stats=info["stats"])


# ----------------------------------------------------------------------------- reading
# The data order is GLOBAL: one example order (shuffled from data.seed, a new order every epoch)
# packed into one sequence of rows; optimizer step s uses rows [s*G, (s+1)*G) of it (G = the
# global batch) and process p of P takes rows [s*G + p*G/P, s*G + (p+1)*G/P) of those. So every
# step trains on the same rows whatever the process count: a 2-host run equals a 1-host run.
FORMAT_ORDER = "global"  # the iterator state's "order" (older states had per-host orders)


def ordered(ds, *, shuffle: bool, seed: int, num_epochs: int | None):
    """The global example order of a split: shuffle (a new order every epoch), repeat
    (``num_epochs=None``: forever)."""
    import grain

    ds = grain.MapDataset.source(ds) if not isinstance(ds, grain.MapDataset) else ds
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def row_plan(lengths: np.ndarray, *, seq_len: int, pack: bool, shuffle: bool, seed: int,
             num_epochs: int | None, max_rows: int | None = None) -> list[list[int]]:
    """The global sequence of rows, each a list of example indices: what ``RowPacker`` makes of
    the global order (:func:`ordered`) of examples with these input ``lengths``. A pure function
    of its arguments. ``max_rows`` stops early (needed when ``num_epochs`` is None)."""
    if num_epochs is None and max_rows is None:
        raise ValueError("row_plan: an endless order (num_epochs=None) needs max_rows")
    order = ordered(np.arange(len(lengths)), shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    total = len(lengths) * num_epochs if num_epochs is not None else None
    packer = packing.RowPacker(seq_len, pack)
    rows: list[list[int]] = []
    i = 0
    while (total is None or i < total) and (max_rows is None or len(rows) < max_rows):
        idx = int(order[i])
        i += 1
        n = int(lengths[idx])
        if n > seq_len:
            raise UserError(f"an example of {n + 1} tokens is longer than data.max_len={seq_len}; "
                            f"prepare the data again")
        done = packer.add(idx, n)
        if done:
            rows.append(done)
    if max_rows is None or len(rows) < max_rows:
        last = packer.flush()
        if last:
            rows.append(last)
    return rows


def host_rows(plan: Sequence[Sequence[int]], step: int, rows_per_batch: int,
              process_index: int = 0, process_count: int = 1) -> list[list[int]]:
    """Process ``process_index``'s rows of optimizer step ``step`` (``rows_per_batch`` per
    process; rows past the end of the plan are empty)."""
    g = rows_per_batch * process_count
    lo = step * g + process_index * rows_per_batch
    out = [list(r) for r in plan[lo:lo + rows_per_batch]]
    return out + [[] for _ in range(rows_per_batch - len(out))]


def num_batches(lengths: np.ndarray, *, seq_len: int, pack: bool, rows_per_batch: int,
                shuffle: bool, seed: int, num_epochs: int, process_count: int) -> int:
    """Optimizer steps that see every example ``num_epochs`` times: the global rows over the
    global batch (``rows_per_batch`` rows on each of ``process_count`` processes)."""
    rows = len(row_plan(lengths, seq_len=seq_len, pack=pack, shuffle=shuffle, seed=seed,
                        num_epochs=num_epochs))
    return math.ceil(rows / (rows_per_batch * process_count))


def _to_example(rec) -> dict:
    tokens = np.asarray(rec["tokens"], np.int32)
    d = ex_lib.model_inputs(tokens, np.asarray(rec["loss_mask"], np.int32))
    d["index"] = int(rec["index"])
    return d


class BatchIterator:
    """Host-local batches ``{tokens, targets, loss_mask, segment_ids, positions}`` int32
    [rows_per_batch, seq_len] plus ``example_ids`` (per row, the indices of its examples).

    Yields exactly ``num_batches`` batches: this process's rows of each step of the global
    :func:`row_plan` (see the note above it); after the data ends, rows are empty (segment 0,
    loss mask 0). ``lengths``: the split's input lengths (``PreparedData.lengths``; read from
    ``source`` when None). ``get_state``/``set_state`` use JSON bytes (grain's checkpoint handler
    stores them per process): the number of batches taken, which is all a restored iterator needs
    to continue at the exact next batch.
    """

    def __init__(self, source, *, seq_len: int, pack: bool, rows_per_batch: int,
                 num_batches: int, shuffle: bool, seed: int, num_epochs: int | None,
                 process_index: int = 0, process_count: int = 1, read_threads: int = 2,
                 lengths: np.ndarray | None = None):
        self.source = source
        self.seq_len = seq_len
        self.rows_per_batch = rows_per_batch
        self.num_batches = num_batches
        self.process_index, self.process_count = process_index, process_count
        self.read_threads = max(1, read_threads)
        if lengths is None:
            lengths = np.asarray([len(source[i]["tokens"]) - 1 for i in range(len(source))])
        self.plan = row_plan(lengths, seq_len=seq_len, pack=pack, shuffle=shuffle, seed=seed,
                             num_epochs=num_epochs,
                             max_rows=num_batches * rows_per_batch * process_count)
        self._count = 0
        self._it = None

    def __iter__(self):
        return self

    def batch(self, step: int) -> dict:
        """This process's batch of optimizer step ``step`` (a pure function of the plan)."""
        rows = host_rows(self.plan, step, self.rows_per_batch, self.process_index,
                         self.process_count)
        batch = packing.empty_rows(self.rows_per_batch, self.seq_len)
        for r, idxs in enumerate(rows):
            if idxs:
                arrays = packing.make_row([_to_example(self.source[i]) for i in idxs], self.seq_len)
                for k in packing.ROW_KEYS:
                    batch[k][r] = arrays[k]
        batch["example_ids"] = rows
        return batch

    def _start(self) -> None:
        import grain

        ds = grain.MapDataset.range(self._count, self.num_batches).map(self.batch)
        opts = grain.ReadOptions(num_threads=self.read_threads,
                                 prefetch_buffer_size=2 * self.read_threads)
        self._it = iter(ds.to_iter_dataset(opts))

    def __next__(self) -> dict:
        if self._count >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._start()
        out = next(self._it)
        self._count += 1
        return out

    def get_state(self) -> bytes:
        """JSON bytes ``{"batches": <taken so far>, "order": "global"}``."""
        return json.dumps({"batches": self._count, "order": FORMAT_ORDER}).encode()

    def set_state(self, state: bytes) -> None:
        """Continue after the ``batches`` of a :meth:`get_state` state. UserError for a
        multi-process run restoring a state of an older (per-host) data order."""
        s = json.loads(state)
        if s.get("order") != FORMAT_ORDER and self.process_count > 1:
            raise UserError("this checkpoint was written by an older version whose multi-host "
                            "data order differs from this one; resume it with that version or "
                            "start the fine-tune again in a new workdir")
        self._count = int(s["batches"])
        self._it = None


class StateSnapshot:
    """A frozen iterator state for grain's Orbax handler (async saves read it later)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        """The state bytes given at construction."""
        return self._state


class StateHolder:
    """Receives a state from grain's Orbax handler on restore."""

    state: bytes | None = None

    def set_state(self, state: bytes) -> None:
        """Keep the restored state bytes in ``self.state``."""
        self.state = state

    def start_prefetch(self) -> None:
        """No-op (grain's handler calls it after ``set_state``)."""
