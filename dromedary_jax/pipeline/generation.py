"""The resumable generation loop every stage uses: this host's share of the items not yet in
the records, in batches (one flushed batch of records per generator call), or, with a streaming
generator (the continuous engine), in ONE call whose finished rows are written one by one as
they finish. Either way a kill loses at most the rows in flight."""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

from dromedary_jax.pipeline.records import StageDir
from dromedary_jax.sampling.settings import SamplingSettings

log = logging.getLogger("dromedary_jax.pipeline")


def generate_into(stage: StageDir, name: str, items: Sequence[Mapping], generator, *,
                  batch_size: int, seed: int, settings: SamplingSettings,
                  make_record: Callable[[Mapping, str], dict], shared_prefix: str | None = None,
                  label: str = "") -> int:
    """Generate the items of ``items`` (dicts with "id" and "prompt") that this host owns and
    that no shard of ``name`` holds yet; returns how many were generated. Ends with a barrier,
    so afterwards every host sees every record.

    ``settings``: the sampling settings of every call (``SamplingSettings.from_config(section,
    path)``), passed as ``generator.generate(..., settings=settings)``.

    Every host makes the SAME number of generator calls (the most any host needs; a host with
    fewer items passes an empty batch): a model-backed generator runs collectives across hosts.
    A generator whose ``streams`` attribute is true (``ModelGenerator`` with the continuous
    engine) gets every item in ONE call with ``on_result``, and each finished record is appended
    (flushed) as it finishes; with several hosts every host makes that call, an empty one where
    it has nothing left.

    Progress: when the generator has a true ``progress`` attribute (``ModelGenerator``, from
    ``config.model.progress``), process 0 shows ONE bar over this host's items with the
    generated tokens/s and an ETA, passed to every call as ``generate(..., progress=bar)``
    (``progress=False`` on the other hosts)."""
    hosts = stage.hosts
    writer = stage.writer(name)
    bar, extra = None, {}
    try:
        todo = [it for it in hosts.share(list(items)) if it["id"] not in writer.done]
        if todo and hosts.is_main:
            log.info("%s: %d to generate on this host (%d hosts; %d already done)",
                     label or name, len(todo), hosts.count, len(writer.done))
        if getattr(generator, "progress", False) is True:
            if todo and hosts.is_main:
                from dromedary_jax.progress import TokenProgress

                bar = TokenProgress.create(len(todo), desc=f"{stage.stage}: {label or name}")
            extra = {"progress": bar if bar is not None else False}  # no per-call bars
        if getattr(generator, "streams", False):
            _stream(writer, todo, generator, make_record, hosts, shared_prefix=shared_prefix,
                    seed=seed, settings=settings, **extra)
        else:
            _batches(writer, todo, generator, make_record, hosts, batch_size,
                     shared_prefix=shared_prefix, seed=seed, settings=settings, **extra)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    hosts.barrier(f"{stage.stage}-{name}-{label}-generated")
    return len(todo)


def _stream(writer, todo: list, generator, make_record, hosts, **call) -> None:
    """One generator call over ``todo`` whose results are appended to ``writer`` as they come
    (made even with nothing to do when there are several hosts: it joins their collectives)."""
    written: set[int] = set()

    def on_result(i: int, text: str) -> None:
        writer.append([make_record(todo[i], text)])
        written.add(i)

    if not todo and hosts.count == 1:
        return
    texts = generator.generate([it["prompt"] for it in todo], ids=[it["id"] for it in todo],
                               on_result=on_result, **call)
    if len(texts) != len(todo):
        raise RuntimeError(f"generator returned {len(texts)} texts for {len(todo)} prompts")
    missing = [i for i in range(len(todo)) if i not in written]  # a generator that did not stream
    writer.append([make_record(todo[i], texts[i]) for i in missing])


def _batches(writer, todo: list, generator, make_record, hosts, batch_size: int, **call) -> None:
    """Generator calls of ``batch_size`` items, each flushed to ``writer``; every host makes the
    same number of calls (an empty batch where it has run out)."""
    n_calls = -(-len(todo) // batch_size)
    if hosts.count > 1:
        n_calls = hosts.allmax(n_calls)
    for start in range(0, n_calls * batch_size, batch_size):
        batch = todo[start:start + batch_size]
        texts = generator.generate([it["prompt"] for it in batch], ids=[it["id"] for it in batch],
                                   **call)
        if len(texts) != len(batch):
            raise RuntimeError(f"generator returned {len(texts)} texts for {len(batch)} prompts")
        writer.append([make_record(it, text) for it, text in zip(batch, texts)])
