"""Batched sampler (issue 3): cache correctness, HF parity, batch-invariant randomness, stop
strings, shared prefix, sharding, logit bias and n-gram penalties."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dromedary_jax as dj
from dromedary_jax.errors import UserError
from dromedary_jax.sampling import PrefixCache, make_batch, prefill_prefix
from dromedary_jax.sampling.api import loop_inputs, run_batches
from dromedary_jax.sampling.buckets import bucket, gen_slots
from dromedary_jax.sampling.decode_loop import decode, layer_weights, prefill
from dromedary_jax.sampling.logits_processing import ngram_completion_mask
from dromedary_jax.sampling.settings import SamplingSettings
from dromedary_jax.sampling.stop_strings import truncate_at_stop
from dromedary_jax.sampling.text import continuation_text, encode_prompts
from helpers import ours_from_hf, tiny_hf_model

PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [1, 3],
           [1, 40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(0)


@pytest.fixture(scope="module")
def model(hf):
    return ours_from_hf(hf)


@pytest.fixture(scope="module")
def model400():
    """A model whose vocabulary fits the LLaMA-style SentencePiece fixture (400 pieces)."""
    return ours_from_hf(tiny_hf_model(3, vocab_size=400))


@pytest.fixture(scope="module")
def hf_gqa():
    return tiny_hf_model(1, num_key_value_heads=2)


def test_buckets():
    assert [bucket(n) for n in (1, 16, 17, 100, 512, 513, 1500)] == [16, 16, 32, 128, 512, 768, 1536]
    # generated-token slots: max_new_tokens rounded up to 16, not to a power of two
    assert [gen_slots(n) for n in (1, 16, 17, 65, 256, 300)] == [16, 16, 32, 80, 256, 304]


@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("unstack", [False, True])  # scanned (TPU/GPU) or unstacked (CPU) layers
def test_cached_decoding_equals_full_forward(model, with_prefix, unstack):
    steps = 6
    spec, knobs = loop_inputs(model, SamplingSettings(max_new_tokens=steps, eos_id=-1),
                              keep_logits=True)
    spec = dataclasses.replace(spec, unstack_layers=unstack)
    prefix = prefill_prefix(model, [1, 30, 31, 32, 33]) if with_prefix else None
    rows = [p[1:] for p in PROMPTS] if with_prefix else PROMPTS
    plen = prefix.length if prefix else 0
    T = bucket(max(map(len, rows)))
    host = make_batch(rows, np.arange(len(rows), dtype=np.uint32), length=T, batch=len(rows),
                      prefix_len=plen)
    state = prefill(model.params, host, None if prefix is None else prefix.arrays(), knobs,
                    spec=spec, gen_len=bucket(steps))
    weights = layer_weights(model.params, None if prefix is None else prefix.arrays(), spec=spec)
    got = []
    for t in range(steps):
        if t:
            state, _ = decode(model.params, weights, state, knobs, np.int32(t + 1),
                              None if prefix is None else prefix.arrays(), spec=spec)
        assert int(state["t"]) == t + 1
        got.append(np.asarray(state["logits"]))
    toks = np.asarray(state["tokens"])
    # one causal full pass per row over prompt + generated tokens (right-padded to one length)
    full = [(list(prefix.ids) if prefix else []) + row + toks[i, :steps - 1].tolist()
            for i, row in enumerate(rows)]
    width = max(map(len, full))
    want = dj.logits(model, [f + [0] * (width - len(f)) for f in full])
    for i, row in enumerate(rows):
        start = plen + len(row) - 1  # logits that predict generated token 0
        for t in range(steps):
            np.testing.assert_allclose(got[t][i], want[i, start + t], atol=1e-4, rtol=0)


def _hf_greedy(hf, prompts, n):
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          pad_token_id=0, eos_token_id=2)
    res = []
    for row in out[:, L:].tolist():
        res.append(row[: row.index(2)] if 2 in row else row)
    return res


@pytest.mark.parametrize("gqa", [False, True])
def test_greedy_matches_transformers(hf, hf_gqa, gqa):
    ref_model = hf_gqa if gqa else hf
    ours = ours_from_hf(ref_model)
    assert ours.config.num_kv_heads == (2 if gqa else 4)
    want = _hf_greedy(ref_model, PROMPTS, 12)
    got = dj.generate(ours, PROMPTS, max_new_tokens=12, eos_id=2)
    assert got == want


def test_greedy_matches_transformers_with_tied_embeddings():
    # batch 4: the CPU decode path's vocab-major output projection is the embedding itself
    ref_model = tiny_hf_model(0, tie_word_embeddings=True)
    ours = ours_from_hf(ref_model)
    assert ours.config.tie_embeddings
    assert dj.generate(ours, PROMPTS, max_new_tokens=12, eos_id=2) == _hf_greedy(
        ref_model, PROMPTS, 12)


def test_eos_is_excluded_and_stops_the_row(model):
    free = dj.generate(model, PROMPTS, max_new_tokens=8, eos_id=-1)
    eos = free[0][3]  # pretend row 0's 4th greedy token is EOS
    got = dj.generate(model, PROMPTS, max_new_tokens=8, eos_id=eos)
    for f, g in zip(free, got):
        assert g == (f[: f.index(eos)] if eos in f else f)
    assert got[0] == free[0][:3]


def test_same_sample_at_any_batch_size_and_position(model, sp_tokenizer):
    rng = np.random.RandomState(0)
    prompts = [" ".join(rng.choice(["the", "fox", "sorry", "answer", "why", "how"], rng.randint(1, 12)))
               for _ in range(16)]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3, eos_id=-1)
    full = dj.generate_text(model, sp_tokenizer, prompts, batch_size=16, **kw)
    by4 = dj.generate_text(model, sp_tokenizer, prompts, batch_size=4, **kw)
    assert by4 == full
    rev = dj.generate_text(model, sp_tokenizer, prompts[::-1], ids=list(range(16))[::-1],
                           batch_size=4, **kw)
    assert rev[::-1] == full
    for i in (0, 7, 15):
        one = dj.generate_text(model, sp_tokenizer, [prompts[i]], ids=[i], batch_size=1, **kw)
        assert one == [full[i]]
    # different example ids (same prompt) give different samples; a different seed too
    same_prompt = dj.generate_text(model, sp_tokenizer, [prompts[0]] * 4, batch_size=4, **kw)
    assert len(set(same_prompt)) == 4
    reseeded = dj.generate_text(model, sp_tokenizer, prompts, batch_size=16, **dict(kw, seed=4))
    assert sum(a != b for a, b in zip(reseeded, full)) >= 12


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked distributions
def test_nucleus_mask_is_the_sorted_definition(scale):
    from dromedary_jax.sampling.logits_processing import nucleus_mask

    logits = np.random.RandomState(int(scale * 10)).normal(size=(8, 700)) * scale
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    for top_p in (1e-6, 0.3, 0.9, 0.98):
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p  # mass before < top_p
        want = np.zeros_like(keep_sorted)
        np.put_along_axis(want, order, keep_sorted, axis=-1)
        got = np.asarray(nucleus_mask(jnp.asarray(logits, jnp.float32), jnp.float32(top_p)))
        assert (got == want).all(), (scale, top_p, got.sum(-1), want.sum(-1))
    assert np.asarray(nucleus_mask(jnp.asarray(logits, jnp.float32), jnp.float32(1.0))).all()


def test_draw_follows_the_kept_distribution():
    from dromedary_jax.sampling.logits_processing import draw

    logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0, 3.0, 0.5]], jnp.float32)
    keep = jnp.asarray([[True, True, True, True, False, True]])  # the most likely one is out
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    toks = np.asarray(jax.jit(jax.vmap(lambda k: draw(k[None], logits, keep)[0]))(keys))
    w = np.exp(np.asarray(logits[0], np.float64)) * np.asarray(keep[0])
    freq = np.bincount(toks, minlength=6) / n
    assert freq[4] == 0
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.012)
    # no mask: every token, including the most likely, in proportion
    toks = np.asarray(jax.jit(jax.vmap(lambda k: draw(k[None], logits)[0]))(keys))
    w = np.exp(np.asarray(logits[0], np.float64))
    np.testing.assert_allclose(np.bincount(toks, minlength=6) / n, w / w.sum(), atol=0.012)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1)
    assert dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, temperature=1.0, top_k=1) == greedy
    assert dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, temperature=1.0,
                       top_p=1e-6) == greedy
    assert dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, temperature=1.0) != greedy


def _split_stop(tok, toks):
    """A 4-char stop string straddling a token boundary, first occurring there; or None."""
    text = tok.decode(toks)
    for k in range(1, len(toks) - 1):
        head = tok.decode(toks[: k + 1])
        b = len(head)
        if not text.startswith(head) or b < 2 or b + 2 > len(text):
            continue
        stop = text[b - 2: b + 2]
        if stop.strip() == stop and text.find(stop) == b - 2:
            return stop
    return None


def test_stop_strings_cut_every_row(model, sp_tokenizer):
    prompts = ["the quick brown fox", "why", "please explain how", "sorry", "answer the question"]
    kw = dict(max_new_tokens=24, eos_id=-1)
    free_ids = dj.generate(model, [sp_tokenizer.encode(p) for p in prompts], **kw)
    free = [continuation_text(sp_tokenizer, sp_tokenizer.encode(p), t)
            for p, t in zip(prompts, free_ids)]
    stops = []
    for toks in free_ids[:3]:
        s = _split_stop(sp_tokenizer, toks)
        assert s is not None
        stops.append(s)
    got = dj.generate_text(model, sp_tokenizer, prompts, stop=stops, stop_check_every=4, **kw)
    want = [truncate_at_stop(t, stops) for t in free]
    assert got == want
    assert all(len(g) < len(f) for g, f in zip(got[:3], free[:3]))


def test_stopped_rows_end_the_loop_early(model):
    spec, knobs = loop_inputs(model, SamplingSettings(max_new_tokens=64, eos_id=-1))
    out = run_batches(model, PROMPTS, spec=spec, knobs=knobs, row_ids=np.arange(4, dtype=np.uint32),
                      is_stopped=lambda i, toks: True, stop_check_every=2)
    assert [len(o) for o in out] == [3] * 4  # 1 prefill step + one chunk of 2, then all done


def test_mark_stopped_checks_only_running_rows_with_new_tokens():
    from dromedary_jax.sampling.stop_strings import mark_stopped

    tokens = np.array([[5, 9, 0], [5, 9, 0], [5, 9, 0], [5, 9, 0], [5, 9, 0]])
    done = np.array([False, True, False, False, False])
    n_valid = np.array([2, 2, 2, 1, 2])
    last = np.array([1, 1, 2, 0, 1])  # row 2 has no new token since the last check
    asked = []

    def is_stopped(example, toks):
        asked.append(example)
        return toks[-1] == 9  # rows 0 and 4 end in 9; row 3 only holds [5]

    examples = np.array([10, 11, 12, 13, 14])
    hit = mark_stopped(done, n_valid, last, tokens, examples, is_stopped, rows=[0, 1, 2, 3])
    assert hit and done.tolist() == [True, True, False, False, False]  # row 4 is not in rows
    assert asked == [10, 13]  # done row 1 and unchanged row 2 are not decoded again
    assert not mark_stopped(done, n_valid, n_valid, tokens, examples, is_stopped, rows=range(5))


def test_shared_prefix_equals_full_prompts(model, sp_tokenizer, model400, llama_sp_tokenizer):
    prefix = [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 50, 51, 52, 53, 54, 55, 56, 57]
    suffixes = [p[1:] for p in PROMPTS] + [[]]
    kw = dict(max_new_tokens=10, eos_id=-1)
    full = dj.generate(model, [prefix + s for s in suffixes], **kw)
    cache = PrefixCache()
    assert dj.generate(model, suffixes, shared_prefix=prefix, prefix_cache=cache, **kw) == full
    sampled_full = dj.generate(model, [prefix + s for s in suffixes], temperature=1.0, **kw)
    assert dj.generate(model, suffixes, shared_prefix=prefix, prefix_cache=cache,
                       temperature=1.0, **kw) == sampled_full
    assert (cache.misses, cache.hits) == (1, 1)  # prefilled once, reused by the second call

    # generate_text: the model reads encode(prefix + prompt) for every row, whatever the seam
    # (a prompt starting with a space gives no lone "▁" token; "why" right after "\n" merges)
    for m, tok in ((model, sp_tokenizer), (model400, llama_sp_tokenizer)):
        text_prefix, prompts = "### User: hi\n\nUser:", [" why", " sorry the fox", "", "why"]
        rows = [tok.encode(text_prefix + p) for p in prompts]
        want = [continuation_text(tok, r, t)
                for r, t in zip(rows, dj.generate(m, rows, max_new_tokens=8, eos_id=2))]
        got = dj.generate_text(m, tok, prompts, max_new_tokens=8, shared_prefix=text_prefix)
        assert got == want
    # the LLaMA-style tokenizer puts a lone "▁" before " why" encoded on its own
    assert rows[0] != tok.encode(text_prefix) + tok.encode(" why", bos=False)


def test_stop_string_with_a_leading_space_at_the_first_generated_token(model400,
                                                                       llama_sp_tokenizer):
    """The first generated token's text is read as it continues the prompt: " word" (with its
    space), so a stop string " word" is found at once; decoding the lone token drops the space."""
    tok = llama_sp_tokenizer
    word_ids = [i for i in range(tok.vocab_size)
                if tok.id_to_piece(i).startswith("\u2581") and tok.id_to_piece(i)[1:].isalpha()]
    prompt = "the quick brown fox"
    ids = tok.encode(prompt)
    bias = {word_ids[0]: 100.0}  # the first generated token is "▁<word>"
    first = dj.generate(model400, [ids], max_new_tokens=1, eos_id=-1, logit_bias=bias)[0]
    assert first == [word_ids[0]]
    stop = " " + tok.id_to_piece(word_ids[0])[1:]
    assert not tok.decode(first).startswith(" ")  # what the old check saw
    assert continuation_text(tok, ids, first) == stop
    got = dj.generate_text(model400, tok, [prompt], max_new_tokens=12, eos_id=-1, stop=[stop],
                           stop_check_every=1, logit_bias=bias)
    assert got == [""]


def test_generated_text_keeps_its_leading_space(model400, llama_sp_tokenizer):
    tok = llama_sp_tokenizer
    prompt = "the quick brown fox"
    new = dj.generate(model400, [tok.encode(prompt)], max_new_tokens=6, eos_id=-1)[0]
    got = dj.generate_text(model400, tok, [prompt], max_new_tokens=6, eos_id=-1)[0]
    assert prompt + got == tok.decode(tok.encode(prompt) + new)


def test_encode_prompts_equals_the_joined_text(sp_tokenizer, llama_sp_tokenizer):
    for tok in (sp_tokenizer, llama_sp_tokenizer):
        prefix = "Principles ...\n\nUser:"
        questions = [" What is 2+2?", " Why?", "x", ""]
        pre, rows = encode_prompts(tok, questions, prefix)
        for q, r in zip(questions, rows):
            assert pre + r == tok.encode(prefix + q)
        assert pre == tok.encode(prefix)[:len(pre)] and len(pre) >= len(tok.encode(prefix)) - 1


def test_prefix_cache_tracks_weights(hf):
    m = ours_from_hf(hf)
    cache = PrefixCache()
    a = cache.get(m, [1, 2, 3])
    assert cache.get(m, [1, 2, 3]) is a
    m.set_params({k: v * 1.0 for k, v in m.params.items()})  # new arrays: stale entry not reused
    b = cache.get(m, [1, 2, 3])
    assert b is not a and b.matches(m) and not a.matches(m)
    with pytest.raises(UserError):
        dj.generate(m, [[4]], max_new_tokens=2, shared_prefix=a)


def test_eight_devices_match_one(hf, sp_tokenizer):
    assert len(jax.devices()) == 8
    mesh = dj.make_mesh((2, 2, 2))
    sharded = ours_from_hf(hf, mesh=mesh)
    single = ours_from_hf(hf)
    prompts = PROMPTS + [[1, 77, 78]]  # 5 rows: padded to a multiple of the 4 batch shards
    assert dj.generate(sharded, prompts, max_new_tokens=8, eos_id=-1) == \
        dj.generate(single, prompts, max_new_tokens=8, eos_id=-1)
    kw = dict(max_new_tokens=12, shared_prefix="### User: hi\n", stop=["e"], temperature=1.0,
              stop_check_every=3)
    texts = ["why", "sorry the fox", "how", "the answer"]
    assert dj.generate_text(sharded, sp_tokenizer, texts, **kw) == \
        dj.generate_text(single, sp_tokenizer, texts, **kw)


def test_logit_bias(model):
    free = dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1)
    first = free[0][0]
    banned = dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, logit_bias={first: -100.0})
    assert all(first not in row for row in banned)
    assert banned[0][0] != first
    forced = dj.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1, logit_bias={99: 100.0})
    assert forced == [[99] * 6] * len(PROMPTS)


def test_ngram_completion_mask():
    gen = jax.numpy.asarray([[5, 6, 7, 5, 6, 0, 0, 0]])
    m3 = np.asarray(ngram_completion_mask(gen, 5, 3, 10))[0]
    assert np.flatnonzero(m3).tolist() == [7]  # "5 6" seen before, followed by 7
    m2 = np.asarray(ngram_completion_mask(gen, 4, 2, 10))[0]  # last token 5: "5 6" seen
    assert np.flatnonzero(m2).tolist() == [6]
    assert not np.asarray(ngram_completion_mask(gen, 2, 3, 10)).any()  # too short for a 3-gram
    m1 = np.asarray(ngram_completion_mask(gen, 3, 1, 10))[0]
    assert np.flatnonzero(m1).tolist() == [5, 6, 7]


def test_ngram_penalties_prevent_repeats(model):
    bias = {40: 20.0, 41: 20.0, 42: 20.0}  # the model now cycles through 3 tokens
    kw = dict(max_new_tokens=30, eos_id=-1, logit_bias=bias)

    def repeated_trigrams(row):
        grams = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        return len(grams) - len(set(grams))

    plain = dj.generate(model, PROMPTS, **kw)
    assert all(repeated_trigrams(r) > 0 for r in plain)
    penal = dj.generate(model, PROMPTS, ngram_penalties=((3, 1e4), (4, 1e4)), **kw)
    assert all(repeated_trigrams(r) == 0 for r in penal)


def test_user_errors(model, sp_tokenizer):
    with pytest.raises(UserError, match="prompt 1 is empty"):
        dj.generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(UserError, match="ids has"):
        dj.generate(model, [[1]], max_new_tokens=2, ids=[1, 2])
    with pytest.raises(UserError, match="top_p"):
        dj.generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(UserError, match="outside"):
        dj.generate(model, [[1, 999]], max_new_tokens=2)
    with pytest.raises(UserError, match="list of strings"):
        dj.generate_text(model, sp_tokenizer, "hello", max_new_tokens=2)


# ----------------------------------------------------------------------------- argument checks
# Every bad call below raises a one-line UserError before anything is compiled or run.
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("prompts,kwargs,match", [
    # a flat prompt list / 1-D array used to become one-token prompts
    ([1, 5, 6], {}, r"prompt_ids must be a list of prompts .*wrap a single prompt: \[ids\]"),
    (np.array([1, 5, 6]), {}, r"wrap a single prompt: \[ids\]"),
    (["hello"], {}, r"prompt_ids\[0\] is a string .*use generate_text"),
    ([[[1, 2], [3]]], {}, r"prompt_ids\[0\] is not a flat list of token ids"),
    ([[[1, 2], [3, 4]]], {}, r"prompt_ids\[0\] has shape \(2, 2\)"),
    ([[1, 1.7]], {}, r"prompt_ids\[0\] holds 1.7 .*token ids must be integers"),
    (np.array([[1.0, 5.0]]), {}, "token ids must be integers"),
    ([[1, None]], {}, "token ids must be integers"),
    ([[1, True]], {}, "token ids must be integers"),
    # NaN / inf / degenerate settings
    (PROMPTS, dict(logit_bias={9: NAN}), r"logit_bias\[9\] must be a finite number"),
    (PROMPTS, dict(logit_bias={9: 1e39}), r"logit_bias\[9\] must be a finite number"),
    (PROMPTS, dict(ngram_penalties=[(1, NAN)]), "ngram_penalties: the penalty .* finite"),
    (PROMPTS, dict(temperature=INF), "temperature must be a finite number"),
    (PROMPTS, dict(temperature=NAN), "temperature must be a finite number"),
    (PROMPTS, dict(temperature=1e-45), r"temperature must be 0 \(greedy\) or >= 0.0001"),
    (PROMPTS, dict(temperature=1e-50), r"temperature must be 0 \(greedy\) or >= 0.0001"),
    (PROMPTS, dict(top_p=1e-50), r"top_p must be in \(0, 1\]"),
    (PROMPTS, dict(top_p=NAN), "top_p must be a finite number"),
    # lengths: refused beyond 4x max_seq_len (256 here), before any allocation
    (PROMPTS, dict(max_new_tokens=10**8), r"max_new_tokens must be at most 4x .* 256 \(1024\)"),
    (PROMPTS, dict(max_new_tokens=2**40), "max_new_tokens must be at most 4x"),
    ([[1] * 100], dict(max_new_tokens=1000), r"prompt \(100 tokens\) \+ max_new_tokens \(1000\)"),
    ([[5]], dict(shared_prefix=[1] * 1000, max_new_tokens=100), r"prompt \(1001 tokens\)"),
    # shared_prefix of generate is token ids
    (PROMPTS, dict(shared_prefix="hello"), "shared_prefix must be token ids .*use generate_text"),
    (PROMPTS, dict(shared_prefix=5), "shared_prefix must be token ids"),
    (PROMPTS, dict(shared_prefix=[1, 2.5]), "shared_prefix must be token ids"),
    # wrong types
    (PROMPTS, dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    (PROMPTS, dict(temperature="0.5"), "temperature must be a number, got '0.5'"),
    (PROMPTS, dict(top_p=None), "top_p must be a number"),
    (PROMPTS, dict(seed=None), "seed must be an integer"),
    (PROMPTS, dict(batch_size="a"), "batch_size must be an integer"),
    (PROMPTS, dict(eos_id=2.0), "eos_id must be a token id"),
    (PROMPTS, dict(eos_id="a"), "eos_id must be a token id"),
    (PROMPTS, dict(eos_id=[2, "a"]), "eos_id must be an integer"),
    (PROMPTS, dict(ids=5), "ids must be a list with one example id"),
    (PROMPTS, dict(ids=[0, 1, 2, True]), r"ids\[3\] = True"),
    (PROMPTS, dict(logit_bias={5: "abc"}), r"logit_bias\[5\] must be a number"),
    (PROMPTS, dict(logit_bias=[(5, 1.0)]), "logit_bias must be a mapping"),
    (PROMPTS, dict(ngram_penalties=[("a", 1)]), "ngram_penalties: n must be an integer"),
    (PROMPTS, dict(ngram_penalties=[(3, "x")]), "ngram_penalties: the penalty for n=3 must be a"),
    (PROMPTS, dict(ngram_penalties=3), "ngram_penalties must be a list of"),
    # no more silent clamping or truncation
    (PROMPTS, dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (PROMPTS, dict(batch_size=-5), "batch_size must be >= 1, got -5"),
    (PROMPTS, dict(max_new_tokens=2.7), "max_new_tokens must be an integer, got 2.7"),
    (PROMPTS, dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
    (PROMPTS, dict(top_k=2.5), "top_k must be an integer"),
])
def test_generate_rejects_bad_arguments(model, prompts, kwargs, match):
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(UserError, match=match):
        dj.generate(model, prompts, **kwargs)


def test_rejects_a_model_path_and_bad_prefix_ids(model, sp_tokenizer):
    with pytest.raises(UserError, match=r"model must be a loaded model.*dj.load_model\(path\)"):
        dj.generate("/models/llama-7b", PROMPTS, max_new_tokens=4)
    with pytest.raises(UserError, match=r"model must be a loaded model.*dj.load_model\(path\)"):
        dj.generate_text("/models/llama-7b", sp_tokenizer, ["hi"], max_new_tokens=4)
    with pytest.raises(UserError, match=r"model must be a dromedary_jax model"):
        dj.generate(None, PROMPTS, max_new_tokens=4)
    with pytest.raises(UserError, match="shared_prefix must be token ids"):
        PrefixCache().get(model, "hello")
    with pytest.raises(UserError, match="shared_prefix must be token ids"):
        prefill_prefix(model, 5)


@pytest.mark.parametrize("tokenizer,prompts,kwargs,match", [
    ("/models/tokenizer.model", ["hi"], {}, r"tokenizer must be a loaded tokenizer.*"
                                            r"dj.load_tokenizer\(path\)"),
    (None, ["hi"], {}, r"tokenizer must be a dromedary_jax tokenizer.*dj.load_tokenizer"),
    ("sp", None, {}, "prompts must be a list of strings"),
    ("sp", [1, 2], {}, r"prompts\[0\] is 1, not a string"),
    ("sp", [None], {}, r"prompts\[0\] is None, not a string"),
    ("sp", ["hi"], dict(stop=5), "stop must be a string or a list of strings, got 5"),
    ("sp", ["hi"], dict(stop_check_every=0), "stop_check_every must be >= 1"),
    ("sp", ["hi"], dict(stop_check_every=2.5), "stop_check_every must be an integer"),
    ("sp", ["hi"], dict(temperature=NAN), "temperature must be a finite number"),
])
def test_generate_text_rejects_bad_arguments(model, sp_tokenizer, tokenizer, prompts, kwargs,
                                             match):
    tokenizer = sp_tokenizer if tokenizer == "sp" else tokenizer
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(UserError, match=match):
        dj.generate_text(model, tokenizer, prompts, **kwargs)


def test_generate_text_checks_the_tokenizer_fits_the_model(model, sp_tokenizer):
    import copy
    import types

    small = types.SimpleNamespace(config=dataclasses.replace(model.config, vocab_size=64),
                                  params=model.params, mesh=None)
    with pytest.raises(UserError, match="tokenizer has 256 tokens but the model's vocab_size "
                                        "is 64"):
        dj.generate_text(small, sp_tokenizer, ["hi"], max_new_tokens=4)
    # a tokenizer smaller than the model's (padded) vocabulary is normal
    smaller_tok = copy.copy(sp_tokenizer)
    smaller_tok.vocab_size = 200
    kw = dict(max_new_tokens=2, eos_id=-1)
    assert dj.generate_text(model, smaller_tok, ["why"], **kw) == \
        dj.generate_text(model, sp_tokenizer, ["why"], **kw)


def test_valid_argument_forms_still_work(model):
    rows = np.asarray([[1, 5, 6, 7], [1, 40, 41, 42]])
    want = dj.generate(model, rows.tolist(), max_new_tokens=2, eos_id=-1)
    assert len(want) == 2
    assert dj.generate(model, rows, max_new_tokens=np.int64(2), eos_id=np.int32(-1),
                       temperature=np.float32(0), top_p=1, seed=np.uint32(0),
                       batch_size=np.int64(2), logit_bias={}, ngram_penalties=None) == want
