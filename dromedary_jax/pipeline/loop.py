"""The resumable generation loop every stage uses: this host's share of the items not yet in
the records, in batches; one flushed batch of records per generator call."""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

from dromedary_jax.pipeline.records import StageDir

log = logging.getLogger("dromedary_jax.pipeline")


def sampling_kwargs(section) -> dict:
    """Generator keyword arguments from a config section with the usual sampling keys."""
    out = dict(max_new_tokens=int(section.max_new_tokens), temperature=float(section.temperature),
               top_p=float(section.top_p))
    bias = section.get("logit_bias")
    out["logit_bias"] = dict(bias) if bias else None
    stop = section.get("stop")
    out["stop"] = tuple(stop) if stop else ()
    return out


def generate_into(stage: StageDir, name: str, items: Sequence[Mapping], generator, *,
                  batch_size: int, seed: int, gen_kwargs: Mapping,
                  make_record: Callable[[Mapping, str], dict], shared_prefix: str | None = None,
                  label: str = "") -> int:
    """Generate the items of ``items`` (dicts with "id" and "prompt") that this host owns and
    that no shard of ``name`` holds yet; returns how many were generated. Ends with a barrier,
    so afterwards every host sees every record.

    Every host makes the SAME number of generator calls (the most any host needs; a host with
    fewer items passes an empty batch): a model-backed generator runs collectives across hosts.

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
        n_calls = -(-len(todo) // batch_size)
        if hosts.count > 1:
            n_calls = hosts.allmax(n_calls)
        for start in range(0, n_calls * batch_size, batch_size):
            batch = todo[start:start + batch_size]
            texts = generator.generate([it["prompt"] for it in batch], ids=[it["id"] for it in batch],
                                       shared_prefix=shared_prefix, seed=seed, **gen_kwargs, **extra)
            if len(texts) != len(batch):
                raise RuntimeError(f"generator returned {len(texts)} texts for {len(batch)} prompts")
            writer.append([make_record(it, text) for it, text in zip(batch, texts)])
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    hosts.barrier(f"{stage.stage}-{name}-{label}-generated")
    return len(todo)
