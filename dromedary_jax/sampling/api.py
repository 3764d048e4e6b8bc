"""Public sampling API: ``generate`` (token ids in, new token ids out) and ``generate_text``.

How a call runs: prompts are sorted by length (results come back in input order) and split into
batches of ``batch_size`` rows (the last batch is filled with pad rows that are done from the
start). Each batch is LEFT-padded to a bucketed length (see ``buckets``), prefilled by one jit'ed
call, then decoded by a ``lax.while_loop`` that exits early once every row is done. Without stop
strings the whole generation is one device call; with stop strings it runs in chunks of
``stop_check_every`` steps and the host checks each unfinished row between chunks (see
``stop_strings``). A run therefore compiles one prefill and one decode program per
(prompt bucket, generation bucket, batch size, static sampling settings).

That is the "static" engine. ``engine="continuous"`` (:mod:`dromedary_jax.sampling.engine`)
keeps ``batch_size`` decode slots instead and refills a finished row's slot with the next prompt,
so no slot idles while a batch's longest row finishes; it gives the same tokens.

Randomness: row ``i`` at step ``t`` draws with ``fold_in(fold_in(key(seed), ids[i]), t)``, so an
example gives the same text whatever batch it lands in and whatever the batch size.
``ids`` default to the position in the list; with several processes pass explicit, globally
unique ids (each process passes only its own prompts; see ``host``).

Arguments: each call makes ONE :class:`~dromedary_jax.sampling.settings.SamplingSettings`
(``settings=``, or built from the loose keywords), validated when it is made; the other
arguments are checked in :mod:`dromedary_jax.sampling.checks`. ``generate`` and
``generate_text`` then share one path (``_sample``): the latter only encodes its texts first and
reads the new tokens back as text.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import numpy as np

from dromedary_jax.errors import UserError
from dromedary_jax.model.llama import LAYER_KEYS
from dromedary_jax.sampling.buckets import bucket, gen_slots, round_up
from dromedary_jax.sampling.checks import (
    check_length,
    check_max_new_tokens,
    check_model,
    check_prompts,
    check_texts,
    check_tokenizer,
    eos_ids_in_vocab,
    example_ids,
    int_arg,
    logit_bias_vector,
)
from dromedary_jax.sampling.decode_loop import LoopSpec, decode, layer_weights, prefill
from dromedary_jax.sampling.engine import check_engine, run_engine
from dromedary_jax.sampling.host import (
    batch_rows_per_process,
    batch_to_device,
    check_model_and_prefix,
    global_max,
    local_rows,
    make_batch,
    progress_bar,
    to_device,
)
from dromedary_jax.sampling.prefix_cache import (
    PrefixCache,
    PrefixState,
    default_prefix_cache,
    prefix_token_ids,
)
from dromedary_jax.sampling.settings import (
    UNSET,
    SamplingSettings,
    bias_by_token,
    normalize_eos_id,
    settings_of,
)
from dromedary_jax.sampling.stop_strings import (find_stop, mark_stopped, stop_trigger_mask,
                                                 truncate_at_stop)
from dromedary_jax.sampling.text import continuation_text, encode_prompts

# ----------------------------------------------------------------------------- loop inputs
UNSTACK_MAX_BYTES = 2 * 1024**3


def _unstack_layers(model) -> bool:
    """Use the CPU decode path (see ``step_forward``): on CPU, and only when the extra copy of
    the weights it makes is small."""
    params = model.params
    try:
        platform = next(iter(params["wq"].devices())).platform
    except (AttributeError, StopIteration):
        return False
    size = sum(int(params[k].size) * params[k].dtype.itemsize for k in LAYER_KEYS)
    return platform == "cpu" and size <= UNSTACK_MAX_BYTES


def loop_inputs(model, settings: SamplingSettings, *, seed: int = 0, tokenizer=None,
                keep_logits: bool = False) -> tuple[LoopSpec, dict]:
    """SamplingSettings for ``model`` -> (LoopSpec (static, part of the compiled programs),
    knobs (dynamic arrays)) for prefill/decode and the continuous engine.

    Checks what depends on the model: max_new_tokens at most 4x max_seq_len, EOS ids and logit
    bias ids in the vocabulary (a UserError otherwise). ``seed``: an int (taken mod 2**32).
    ``tokenizer``: the default EOS (``tokenizer.eos_id``; without one, the model config's
    ``eos_token_id``) and the resolution of word / ``"<eos>"`` logit_bias keys. knobs: ``seed``
    uint32, ``temperature`` float32 (1 when greedy), ``top_p`` float32, ``logit_bias`` float32
    [vocab], ``ngram_penalties`` float32 [len(settings.ngram_penalties)], ``max_new`` int32.
    ``keep_logits``: the loop also returns the processed logits (tests)."""
    c = model.config
    check_max_new_tokens(c, settings.max_new_tokens)
    seed = int_arg("seed", seed)
    eos = settings.eos_id
    if eos is None and tokenizer is not None:
        eos = normalize_eos_id(tokenizer.eos_id)
    if eos is None:
        eos = normalize_eos_id(c.eos_token_id)
    if eos is None:
        raise UserError("eos_id: neither the tokenizer nor the model config names an EOS token; "
                        "pass eos_id (-1: no EOS)")
    greedy = settings.greedy
    top_k = settings.top_k if 0 < settings.top_k < c.vocab_size else 0
    bias = logit_bias_vector(bias_by_token(settings.logit_bias, tokenizer), c.vocab_size)
    spec = LoopSpec(config=c, mesh=model.mesh, greedy=greedy,
                    top_k=0 if greedy else top_k,
                    use_top_p=(not greedy) and float(settings.top_p) < 1.0,
                    ngram_ns=tuple(n for n, _ in settings.ngram_penalties),
                    eos_ids=eos_ids_in_vocab(eos, c.vocab_size),
                    keep_logits=keep_logits, unstack_layers=_unstack_layers(model))
    knobs = {
        "seed": np.uint32(seed & 0xFFFFFFFF),
        "temperature": np.float32(settings.temperature if not greedy else 1.0),
        "top_p": np.float32(settings.top_p),
        "logit_bias": bias,
        "ngram_penalties": np.asarray([p for _, p in settings.ngram_penalties], np.float32),
        "max_new": np.int32(settings.max_new_tokens),
    }
    return spec, knobs
# ----------------------------------------------------------------------------- batches
def run_batches(model, prompts: list[list[int]], *, spec: LoopSpec, knobs: dict,
                row_ids: np.ndarray, prefix: PrefixState | None = None, batch_size: int = 32,
                is_stopped: Callable[[int, list[int]], bool] | None = None,
                stop_check_every: int = 16, progress: bool | None = None,
                compile_only: bool = False, stats: dict | None = None,
                on_finish: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """The batching loop behind ``generate``: new tokens per prompt (EOS excluded). Its
    arguments are already checked (``generate`` / ``generate_text``: prompts, settings, batch
    size, length). ``compile_only``: compile the programs the call needs (running one prefill
    per length bucket, for the state's placement), decode nothing, return [].
    ``on_finish(i, tokens)``: called for prompt ``i`` when its batch is done.
    ``stats``: a dict that gets ``slot_steps`` (rows x steps run, pad rows included) and
    ``tokens`` (tokens returned), as :func:`~dromedary_jax.sampling.engine.run_engine` counts."""
    check_model_and_prefix(model, prefix)
    n = len(prompts)
    max_new = int(knobs["max_new"])
    p_len = 0 if prefix is None else prefix.length
    n_all = global_max(n)
    B = round_up(min(batch_size, max(n_all, 1)), batch_rows_per_process(model.mesh))
    G = gen_slots(max_new)
    longest = max((len(p) for p in prompts), default=1)
    if p_len + longest + max_new > model.config.max_seq_len:
        warnings.warn(f"prompt ({p_len + longest} tokens) + max_new_tokens ({max_new}) exceeds the "
                      f"model's max_seq_len {model.config.max_seq_len}", stacklevel=3)
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in range(n)]
    params = model.params
    prefix_arrays = None if prefix is None else prefix.arrays()
    # the CPU path's fused per-layer weights, made once per call (not in every decode chunk)
    weights = (layer_weights(params, prefix_arrays, spec=spec) if spec.unstack_layers and n_all
               else None)
    chunk = stop_check_every if is_stopped is not None else G
    n_batches = math.ceil(n_all / B) if n_all else 0
    bar, own_bar = (None, False) if compile_only else progress_bar(progress, n, n_batches)
    compiled = set()
    st = stats if stats is not None else {}
    st.update(slot_steps=0, tokens=0)
    for b in range(n_batches):
        idx = order[b * B:(b + 1) * B]
        rows = [prompts[i] for i in idx]
        T = bucket(global_max(max((len(r) for r in rows), default=1)))
        host = batch_to_device(make_batch(rows, row_ids[idx], length=T, batch=B, prefix_len=p_len),
                                model.mesh)
        if compile_only:
            if T not in compiled:
                compiled.add(T)
                _compile(params, weights, host, prefix_arrays, knobs, spec, G)
            continue
        state = prefill(params, host, prefix_arrays, knobs, spec=spec, gen_len=G)
        t, last_nv = 1, np.zeros(B, np.int32)
        while True:
            state, all_done = decode(params, weights, state, knobs, np.int32(t + chunk),
                                     prefix_arrays, spec=spec)
            t = int(state["t"])
            if bool(all_done) or t >= max_new:
                break
            if is_stopped is not None:
                toks, nv = local_rows(state["tokens"]), local_rows(state["n_valid"])
                done = local_rows(state["done"]).copy()
                hit = mark_stopped(done, nv, last_nv, toks, idx, is_stopped, range(len(rows)))
                last_nv = nv
                if hit:  # same placement as the state: decode is not compiled again
                    state = dict(state, done=to_device(done, state["done"].sharding))
        toks, nv = local_rows(state["tokens"]), local_rows(state["n_valid"])
        st["slot_steps"] += B * int(state["t"])
        for i, j in enumerate(idx):
            results[j] = toks[i, :nv[i]].tolist()
            st["tokens"] += len(results[j])
            if on_finish is not None:
                on_finish(j, results[j])
        if bar is not None:
            bar.update(len(idx), sum(int(nv[i]) for i in range(len(idx))))
    if bar is not None and own_bar:
        bar.close()
    return [] if compile_only else results


def _compile(params, weights, batch, prefix_arrays, knobs, spec: LoopSpec, gen_len: int) -> None:
    """Compile prefill and decode for these shapes (fills jit's cache). The prefill runs (on
    the pad rows of ``batch``), so decode is compiled for the state exactly as a run places it
    (jit compiles again for an argument whose placement differs)."""
    state = prefill(params, batch, prefix_arrays, knobs, spec=spec, gen_len=gen_len)
    decode.lower(params, weights, state, knobs, np.int32(1), prefix_arrays, spec=spec).compile()


def _check_prefix_arg(shared_prefix):
    """shared_prefix of ``generate``: None, a PrefixState, or token ids (-> tuple of ints)."""
    if shared_prefix is None or isinstance(shared_prefix, PrefixState):
        return shared_prefix
    return prefix_token_ids(shared_prefix)


def _resolve_prefix(model, shared_prefix, prefix_cache: PrefixCache | None) -> PrefixState | None:
    if shared_prefix is None:
        return None
    if isinstance(shared_prefix, PrefixState):
        return shared_prefix
    cache = prefix_cache if prefix_cache is not None else default_prefix_cache(model)
    return cache.get(model, shared_prefix)


def _prompt_len(prompts: list[list[int]], prefix) -> int:
    """Tokens before the first generated one, for the longest prompt (prefix included)."""
    p_len = 0 if prefix is None else len(prefix.ids if isinstance(prefix, PrefixState) else prefix)
    return p_len + max((len(p) for p in prompts), default=1)


# ----------------------------------------------------------------------------- the shared path
def _sample(model, rows, shared_prefix, settings: SamplingSettings, *, tokenizer=None, seed,
            ids, prefix_cache, batch_size, engine, progress, stop_check_every=16,
            compile_only=False, on_result=None) -> list:
    """The one path behind ``generate`` and ``generate_text`` once the prompts are token rows:
    check the rest of the call, prefill the shared prefix, run the engine. With a ``tokenizer``
    (text mode), rows are checked for ``settings.stop`` between chunks and the texts before the
    first stop string are returned; without one, the new token ids. ``on_result(i, result)``:
    called with prompt ``i``'s final result (text or ids) as soon as it is known."""
    c = model.config
    rows = check_prompts(rows, c.vocab_size, allow_empty=shared_prefix is not None)
    spec, knobs = loop_inputs(model, settings, seed=seed, tokenizer=tokenizer)
    batch_size = int_arg("batch_size", batch_size, 1)
    stop_check_every = int_arg("stop_check_every", stop_check_every, 1)
    engine = check_engine(engine)
    row_ids = example_ids(ids, len(rows))
    check_length(c, _prompt_len(rows, shared_prefix), settings.max_new_tokens)
    prefix = _resolve_prefix(model, shared_prefix, prefix_cache)
    text_of = None if tokenizer is None else _text_reader(tokenizer, rows, prefix)
    is_stopped = None
    if settings.stop:
        def is_stopped(i, toks):
            return find_stop(text_of(i, toks), settings.stop) >= 0
    def result_of(i: int, toks: list[int]):
        return toks if text_of is None else truncate_at_stop(text_of(i, toks), settings.stop)

    on_finish = None if on_result is None else (lambda i, toks: on_result(i, result_of(i, toks)))
    kw = {}
    if engine == "continuous" and is_stopped is not None and not compile_only:
        kw["stop_trigger"] = stop_trigger_mask(tokenizer, settings.stop, c.vocab_size)
    run = run_engine if engine == "continuous" else run_batches
    out = run(model, rows, spec=spec, knobs=knobs, row_ids=row_ids, prefix=prefix,
              batch_size=batch_size, is_stopped=is_stopped, stop_check_every=stop_check_every,
              progress=progress, compile_only=compile_only, on_finish=on_finish, **kw)
    return [result_of(i, toks) for i, toks in enumerate(out)]


def _text_reader(tokenizer, rows: list[list[int]], prefix: PrefixState | None):
    """``text_of(i, tokens)``: row i's generated text read as the continuation of its prompt
    (``continuation_text`` looks only at the token the generation follows)."""
    prefix_tail = list(prefix.ids[-1:]) if prefix is not None else []
    last = [list(r[-1:]) or prefix_tail for r in rows]

    def text_of(i: int, toks) -> str:
        return continuation_text(tokenizer, last[i], toks)
    return text_of


def _encode_texts(tokenizer, prompts: list[str], shared_prefix):
    """(shared prefix: ids, a PrefixState or None; token rows) for ``generate_text``."""
    if shared_prefix is not None and not isinstance(shared_prefix, (str, PrefixState)):
        raise UserError(f"shared_prefix must be a string (or a PrefixState), got "
                        f"{type(shared_prefix).__name__}")
    if isinstance(shared_prefix, str):
        ids, rows = encode_prompts(tokenizer, prompts, shared_prefix)
        return ids or None, rows  # an empty prefix string: nothing every row starts with
    if shared_prefix is not None:  # a PrefixState: the prompts continue its ids, no BOS
        return shared_prefix, [tokenizer.encode(p, bos=False) for p in prompts]
    return None, encode_prompts(tokenizer, prompts)[1]


# ----------------------------------------------------------------------------- public API
_U = UNSET  # the loose sampling keywords' defaults: "not given" (see settings.Unset)


def generate(model, prompt_ids, *, max_new_tokens: int = _U["max_new_tokens"],
             temperature: float = _U["temperature"], top_p: float = _U["top_p"],
             top_k: int = _U["top_k"], eos_id=_U["eos_id"], seed: int = 0, ids=None,
             logit_bias: Mapping[int, float] | None = _U["logit_bias"],
             ngram_penalties=_U["ngram_penalties"], shared_prefix=None,
             prefix_cache: PrefixCache | None = None, batch_size: int = 32,
             progress: bool | None = None, compile_only: bool = False,
             engine: str = "static", settings: SamplingSettings | None = None,
             on_result: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """Sample continuations of token-id prompts; returns the NEW tokens per prompt, EOS excluded.

    prompt_ids: a list of prompts, each a list of int token ids (or a 2-D integer array); wrap
    a single prompt as ``[ids]``. The sampling settings come either from ``settings`` (a
    :class:`~dromedary_jax.sampling.settings.SamplingSettings`, without ``stop``: token ids have
    no text) or from the loose keywords ``max_new_tokens`` (required then), ``temperature``,
    ``top_p``, ``top_k``, ``eos_id``, ``logit_bias``, ``ngram_penalties``; giving both is a
    UserError. Their meaning (see SamplingSettings): max_new_tokens: a prompt + max_new_tokens
    longer than the model's max_seq_len only warns, longer than 4x max_seq_len is a UserError.
    temperature 0 = greedy, else >= 1e-4; top_k 0 = off; top_p 1 = off. eos_id: an id, a
    sequence of ids, or None (the model config's eos_token_id); -1 or () disables EOS.
    logit_bias: {token_id: bias} (or ``"#<id>"`` keys) added at every step. ngram_penalties:
    ((n, penalty), ...): a token that would complete an n-gram already present in the generated
    tokens gets ``-penalty`` (e.g. ((3, p3), (4, p4))).
    seed: an int; ids: per-example ids that seed randomness (default: position in the list).
    shared_prefix: token ids common to every prompt (prompts then hold only their suffix), or a
    PrefixState from ``prefill_prefix``; it is prefilled once and cached (``prefix_cache``,
    default: the model's own LRU). batch_size: rows per device batch. progress: a bar over the
    prompts with the generated tokens/s and an ETA, on process 0 only (None, the default: shown
    when there is more than one batch; True / False: always / never; a
    :class:`dromedary_jax.progress.TokenProgress`: update that bar instead, e.g. one bar over
    many calls; ``DROMEDARY_PROGRESS=0`` turns bars off). compile_only: compile the
    programs this call needs (e.g. before timing it), generate nothing and return [] (the
    static engine runs one prefill per length bucket to compile decode for its exact state).
    engine: "static" (batches of ``batch_size`` rows sorted by length, each decoded until its
    last row is done) or "continuous" (``batch_size`` decode slots; a finished row's slot is
    refilled with the next prompt, see :mod:`dromedary_jax.sampling.engine`). Both give the
    same tokens for the same (seed, example id); with several processes, each passes its own
    prompts (and ids) and both run its own rows.
    on_result: ``on_result(i, new_tokens)`` is called once per prompt as soon as its result is
    final (continuous: when its row finishes; static: when its batch does), so a caller can
    write results as they come (the pipeline streams them into its records).
    Bad arguments raise a UserError before anything is compiled or run.
    """
    check_model(model)
    settings = settings_of(settings, dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        eos_id=eos_id, logit_bias=logit_bias, ngram_penalties=ngram_penalties))
    if settings.stop:
        raise UserError("settings.stop needs text: generate samples token ids; use "
                        "generate_text for stop strings")
    return _sample(model, prompt_ids, _check_prefix_arg(shared_prefix), settings, seed=seed,
                   ids=ids, prefix_cache=prefix_cache, batch_size=batch_size, engine=engine,
                   progress=progress, compile_only=compile_only, on_result=on_result)


def generate_text(model, tokenizer, prompts, *, max_new_tokens: int = _U["max_new_tokens"],
                  temperature: float = _U["temperature"], top_p: float = _U["top_p"],
                  top_k: int = _U["top_k"], stop=_U["stop"], logit_bias=_U["logit_bias"],
                  seed: int = 0, ids=None, shared_prefix=None, eos_id=_U["eos_id"],
                  ngram_penalties=_U["ngram_penalties"],
                  prefix_cache: PrefixCache | None = None, batch_size: int = 32,
                  stop_check_every: int = 16, progress: bool | None = None,
                  engine: str = "static", settings: SamplingSettings | None = None,
                  on_result: Callable[[int, str], None] | None = None) -> list[str]:
    """Sample text continuations; returns the text before the first stop string, per prompt.

    ``tokenizer``: from ``dj.load_tokenizer`` (its vocabulary may be smaller than the model's,
    not larger). ``prompts``: a list of strings, each encoded with BOS when the tokenizer's own
    rule adds one (``tokenizer.add_bos``). With ``shared_prefix`` (a string common to every
    prompt, e.g. the principle prompt), each row is ``encode(shared_prefix + prompt)``, and the
    ids every row shares are prefilled once (see :func:`dromedary_jax.sampling.text.encode_prompts`:
    the model reads the same tokens as for the joined text, whatever the seam).
    The sampling settings: ``settings`` or the loose keywords, as in :func:`generate`, plus
    ``stop``; eos_id defaults to ``tokenizer.eos_id``, and logit_bias keys may also be words or
    ``"<eos>"`` (see SamplingSettings). ``stop``: a string or strings, checked for every row
    every ``stop_check_every`` (>= 1) steps (a stop string split across tokens is found too)
    on the generated text read as the continuation of its prompt (a leading space is kept: see
    :func:`dromedary_jax.sampling.text.continuation_text`); the returned texts are read the same way.
    Other arguments (``engine``, ``on_result``: here with the final text) as in :func:`generate`.
    """
    check_model(model)
    check_tokenizer(tokenizer, model)
    prompts = check_texts(prompts)
    settings = settings_of(settings, dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop=stop, eos_id=eos_id, logit_bias=logit_bias, ngram_penalties=ngram_penalties))
    shared_prefix, rows = _encode_texts(tokenizer, prompts, shared_prefix)
    return _sample(model, rows, shared_prefix, settings, tokenizer=tokenizer, seed=seed, ids=ids,
                   prefix_cache=prefix_cache, batch_size=batch_size, engine=engine,
                   progress=progress, stop_check_every=stop_check_every, on_result=on_result)
