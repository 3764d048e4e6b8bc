"""Continuous-batching engine (issue 15): the same tokens as the static path for any slot count,
order of arrival and refill timing; greedy parity with transformers; stop strings, shared prefix,
logit bias, n-gram penalties, EOS; 8 simulated devices; streaming; argument errors."""
import dataclasses

import jax
import numpy as np
import pytest

import dromedary_jax as dj
from dromedary_jax.errors import UserError
from dromedary_jax.sampling.api import example_ids, loop_inputs, run_batches
from dromedary_jax.sampling.engine import rows_bucket, run_engine, tail_slots
from dromedary_jax.sampling.settings import SamplingSettings
from helpers import ours_from_hf, tiny_hf_model
from test_sampling import PROMPTS, _hf_greedy

# very different prompt lengths (1..40 tokens), so static batches and refills differ a lot
_RNG = np.random.RandomState(0)
LONG_PROMPTS = [[1] + _RNG.randint(3, 256, size=n).tolist()
                for n in (0, 39, 3, 17, 1, 25, 8, 2, 33, 5, 12, 0)]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(0)


@pytest.fixture(scope="module")
def model(hf):
    return ours_from_hf(hf)


@pytest.fixture(scope="module")
def model_gqa():
    return ours_from_hf(tiny_hf_model(1, num_key_value_heads=2))


def _eos_of(model, prompts, n):
    """A token some rows generate early: as EOS it ends rows at very different steps."""
    free = dj.generate(model, prompts, max_new_tokens=n, eos_id=-1)
    counts = {}
    for row in free:
        for tok in row[: n // 2]:
            counts[tok] = counts.get(tok, 0) + 1
    return max(counts, key=counts.get)


def _spread_eos(model, prompts, n):
    """EOS ids that end the rows at widely spread steps (row r at about step (5 r) mod n): the
    token row r would generate there (it may end other rows early too)."""
    free = dj.generate(model, prompts, max_new_tokens=n, eos_id=-1)
    return sorted({row[(5 * r) % n] for r, row in enumerate(free) if r % 3})


def test_rows_bucket():
    assert [rows_bucket(k, 16) for k in (1, 4, 5, 8, 9, 16)] == [4, 4, 8, 8, 16, 16]
    assert rows_bucket(3, 3) == 3 and rows_bucket(1, 1) == 1
    assert rows_bucket(1, 8, multiple=4) == 4


def test_tail_slots():
    assert [tail_slots(live, 16, 1, 4) for live in (0, 1, 3, 4, 5, 8, 9, 16)] == [
        4, 4, 4, 4, 8, 8, 16, 16]
    assert tail_slots(1, 8, 4, 1) == 4  # a multiple of the batch shards per process
    assert tail_slots(1, 6, 4, 1) == 6 and tail_slots(1, 5, 1, 1) == 5


@pytest.mark.parametrize("slots", [1, 3])
def test_greedy_equals_static_with_eos_at_any_slot_count(model, slots):
    eos = _eos_of(model, LONG_PROMPTS, 24)
    kw = dict(max_new_tokens=24, eos_id=eos)
    want = dj.generate(model, LONG_PROMPTS, batch_size=4, **kw)
    assert len({len(r) for r in want}) > 3  # rows end at very different steps
    got = dj.generate(model, LONG_PROMPTS, batch_size=slots, engine="continuous", **kw)
    assert got == want


@pytest.mark.parametrize("slots", [2, 8])
def test_sampling_equals_static_in_any_order(model_gqa, slots):
    model = model_gqa
    eos = _eos_of(model, LONG_PROMPTS, 20)
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=40, seed=7, eos_id=eos)
    want = dj.generate(model, LONG_PROMPTS, batch_size=5, **kw)
    got = dj.generate(model, LONG_PROMPTS, batch_size=slots, engine="continuous", **kw)
    assert got == want
    n = len(LONG_PROMPTS)
    rev = dj.generate(model, LONG_PROMPTS[::-1], ids=list(range(n))[::-1], batch_size=slots,
                      engine="continuous", **kw)
    assert rev[::-1] == want
    # randomness really is per example: another seed changes most rows
    other = dj.generate(model, LONG_PROMPTS, batch_size=slots, engine="continuous",
                        **dict(kw, seed=8))
    assert sum(a != b for a, b in zip(other, want)) >= n // 2


def test_max_new_tokens_of_one_and_a_single_prompt(model):
    for n in (1, 2):
        want = dj.generate(model, PROMPTS, max_new_tokens=n, eos_id=-1)
        assert dj.generate(model, PROMPTS, max_new_tokens=n, eos_id=-1, batch_size=2,
                           engine="continuous") == want
    assert dj.generate(model, [PROMPTS[1]], max_new_tokens=5, engine="continuous") == \
        dj.generate(model, [PROMPTS[1]], max_new_tokens=5)
    assert dj.generate(model, [], max_new_tokens=5, engine="continuous") == []


@pytest.mark.parametrize("gqa", [False, True])
def test_greedy_matches_transformers(hf, gqa):
    ref = tiny_hf_model(1, num_key_value_heads=2) if gqa else hf
    ours = ours_from_hf(ref)
    want = _hf_greedy(ref, PROMPTS, 12)
    assert dj.generate(ours, PROMPTS, max_new_tokens=12, eos_id=2, batch_size=2,
                       engine="continuous") == want


def test_logit_bias_and_ngram_penalties_as_static(model):
    free = dj.generate(model, LONG_PROMPTS, max_new_tokens=16, eos_id=-1)
    first = free[0][0]
    kw = dict(max_new_tokens=16, eos_id=-1, logit_bias={first: -100.0, 7: 2.5},
              ngram_penalties=((2, 3.0), (3, 100.0)), temperature=0.8, seed=1)
    want = dj.generate(model, LONG_PROMPTS, batch_size=4, **kw)
    assert all(first not in row for row in want)
    got = dj.generate(model, LONG_PROMPTS, batch_size=3, engine="continuous", **kw)
    assert got == want
    for row in got:  # no repeated trigram
        grams = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams))


def test_stop_strings_and_shared_prefix_as_static(model, sp_tokenizer):
    rng = np.random.RandomState(1)
    words = ["the", "fox", "sorry", "answer", "why", "how", "e"]
    texts = [" ".join(rng.choice(words, rng.randint(1, 14))) for _ in range(11)]
    for prefix, slot_counts in ((None, (1, 8)), ("### User: tell me\n", (3,))):
        kw = dict(max_new_tokens=20, temperature=1.0, seed=2, stop=["e", "###"],
                  shared_prefix=prefix, stop_check_every=3)
        want = dj.generate_text(model, sp_tokenizer, texts, batch_size=4, **kw)
        assert sum(len(w) for w in want) > 0
        for slots in slot_counts:
            got = dj.generate_text(model, sp_tokenizer, texts, batch_size=slots,
                                   engine="continuous", **kw)
            assert got == want, (prefix, slots)
            assert all("e" not in g and "###" not in g for g in got)


def test_stop_trigger_mask(sp_tokenizer):
    from dromedary_jax.sampling.stop_strings import stop_trigger_mask

    V = 5000  # beyond the tokenizer's vocabulary (a padded model vocab): never a trigger

    def text(i):
        try:
            return sp_tokenizer.decode([i])
        except IndexError:
            return None

    mask = stop_trigger_mask(sp_tokenizer, ("###", "User:"), V)
    texts = [text(i) for i in range(V)]
    known = [i for i, t in enumerate(texts) if t is not None]
    assert 100 < len(known) < V and not mask[len(known):].any()
    hits = [texts[i] for i in known if mask[i]]
    assert hits and all(("#" in t) or (":" in t) or ("\ufffd" in t) for t in hits)
    assert all(mask[i] for i in known if "#" in texts[i] or ":" in texts[i])
    assert mask.sum() < len(known) // 4  # most tokens cannot complete these stop strings


def test_stop_trigger_ends_chunks_at_once_with_the_same_texts(model, sp_tokenizer, monkeypatch):
    """A row that samples a trigger token ends the chunk, so the host checks its stop strings
    at once: fewer slot-steps than waiting out ``stop_check_every`` steps, the same texts."""
    from dromedary_jax.sampling import api

    rng = np.random.RandomState(3)
    words = ["the", "fox", "sorry", "answer", "why", "how"]
    texts = [" ".join(rng.choice(words, rng.randint(1, 10))) for _ in range(10)]
    kw = dict(max_new_tokens=24, temperature=1.0, seed=4, stop=["e"], stop_check_every=24,
              batch_size=3)
    want = dj.generate_text(model, sp_tokenizer, texts, **kw)
    stats = []
    real = api.run_engine

    def spy(*a, **k):
        stats.append({})
        return real(*a, stats=stats[-1], **k)

    monkeypatch.setattr(api, "run_engine", spy)
    assert dj.generate_text(model, sp_tokenizer, texts, engine="continuous", **kw) == want
    monkeypatch.setattr(api, "stop_trigger_mask", lambda tok, stop, v: np.zeros(v, bool))
    assert dj.generate_text(model, sp_tokenizer, texts, engine="continuous", **kw) == want
    triggered, untriggered = stats
    assert sum(1 for t in want if len(t) < 20) >= 3  # rows that stopped early
    assert triggered["slot_steps"] < untriggered["slot_steps"]
    assert triggered["chunks"] > untriggered["chunks"]


def test_shared_prefix_token_ids_and_empty_suffix(model):
    prefix = [1, 50, 51, 52, 53, 54, 55]
    prompts = [[], [9, 10], [60] * 20, [], [70, 71, 72]]
    kw = dict(max_new_tokens=10, eos_id=-1, shared_prefix=prefix, temperature=0.7, seed=5)
    want = dj.generate(model, prompts, batch_size=2, **kw)
    assert dj.generate(model, prompts, batch_size=2, engine="continuous", **kw) == want
    # and the prefix really is attended: the same as the full prompts without a prefix
    full = dj.generate(model, [prefix + p for p in prompts], batch_size=2, engine="continuous",
                       **dict(kw, shared_prefix=None))
    assert full == want


def test_finished_rows_stream_out_and_stats(model):
    eos = _spread_eos(model, LONG_PROMPTS, 24)
    spec, knobs = loop_inputs(model, SamplingSettings(max_new_tokens=24, eos_id=eos))
    ids = example_ids(None, len(LONG_PROMPTS))
    seen, st = [], {}
    out = run_engine(model, LONG_PROMPTS, spec=spec, knobs=knobs, row_ids=ids, batch_size=4,
                     on_finish=lambda i, toks: seen.append((i, toks)), stats=st)
    assert sorted(seen) == sorted(enumerate(out))
    assert st["tokens"] == sum(map(len, out))
    assert len({len(r) for r in out}) >= 5
    st_static = {}
    run_batches(model, LONG_PROMPTS, spec=spec, knobs=knobs, row_ids=ids, batch_size=4,
                stats=st_static)
    assert st_static["tokens"] == st["tokens"]
    # refilling finished slots wastes fewer slot-steps than waiting for a batch's last row
    assert st["slot_steps"] < st_static["slot_steps"]
    assert st["refills"] >= 3
    # the tail: the last rows were gathered into fewer slots (4 -> 2 -> 1)
    assert st["compactions"] >= 1 and ("decode", 2, 64, 32) in st["programs"]
    # compile_only compiles (every program the run used) and runs nothing
    compiled = {}
    assert run_engine(model, LONG_PROMPTS, spec=spec, knobs=knobs, row_ids=ids, batch_size=4,
                      compile_only=True, stats=compiled) == []
    kinds = sorted(p[0] for p in compiled["programs"])
    assert kinds.count("decode") == 3 and kinds.count("compact") == 2
    assert kinds.count("refill") >= 2
    assert st["programs"] <= compiled["programs"], st["programs"] - compiled["programs"]


def test_stacked_weights_path(model):
    """The decode step on stacked weights (TPU/GPU and large CPU models) gives the same tokens
    as the CPU path's fused per-layer copies (here with a shared prefix, the prefix's per-layer
    k/v included)."""
    from dromedary_jax.sampling.api import _resolve_prefix

    spec, knobs = loop_inputs(model, SamplingSettings(max_new_tokens=12, eos_id=-1,
                                                      temperature=0.8, top_k=50,
                                                      ngram_penalties=((2, 1.5),)))
    assert spec.unstack_layers  # the tiny model on CPU
    ids = example_ids(None, len(PROMPTS))
    prefix = _resolve_prefix(model, (1, 50, 51, 52), None)
    kw = dict(knobs=knobs, row_ids=ids, prefix=prefix, batch_size=3)
    fused = run_engine(model, PROMPTS, spec=spec, **kw)
    stacked = run_engine(model, PROMPTS, spec=dataclasses.replace(spec, unstack_layers=False),
                         **kw)
    assert stacked == fused
    assert fused == run_batches(model, PROMPTS, spec=spec, **kw)


def test_eight_devices_match_one(hf, sp_tokenizer):
    assert len(jax.devices()) == 8
    mesh = dj.make_mesh((2, 2, 2))
    sharded = ours_from_hf(hf, mesh=mesh)
    single = ours_from_hf(hf)
    prompts = LONG_PROMPTS[:7]
    want = dj.generate(single, prompts, max_new_tokens=8, eos_id=-1, batch_size=4)
    assert dj.generate(sharded, prompts, max_new_tokens=8, eos_id=-1, batch_size=4,
                       engine="continuous") == want
    kw = dict(max_new_tokens=12, shared_prefix="### User: hi\n", stop=["e"], temperature=1.0,
              stop_check_every=3)
    texts = ["why", "sorry the fox", "how", "the answer", "fox", "how how the"]
    # 8 slots over the 4 batch shards: the tail is gathered into 4
    assert dj.generate_text(sharded, sp_tokenizer, texts, batch_size=8, engine="continuous",
                            **kw) == dj.generate_text(single, sp_tokenizer, texts, **kw)


def test_bad_engine_is_a_user_error(model, sp_tokenizer):
    with pytest.raises(UserError, match="engine must be one of"):
        dj.generate(model, PROMPTS, max_new_tokens=2, engine="vllm")
    with pytest.raises(UserError, match="engine must be one of"):
        dj.generate_text(model, sp_tokenizer, ["hi"], max_new_tokens=2, engine=None)
