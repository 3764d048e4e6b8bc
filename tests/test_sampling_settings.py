"""SamplingSettings (issue 14): one typed settings object, validated once, built from a config
section, passed to dj.generate / dj.generate_text and to the pipeline's generators; the same
tokens and texts as the loose keywords."""
import dataclasses
import inspect
import sys

import ml_collections
import numpy as np
import pytest

import dromedary_jax as dj
from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.generator import ModelGenerator
from dromedary_jax.sampling.settings import SamplingSettings, bias_by_token
from dromedary_jax.testing.scripted import ScriptedGenerator
from helpers import ours_from_hf, tiny_hf_model

NAN, INF = float("nan"), float("inf")
PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13], [1, 3]]
TEXTS = ["the quick brown fox", "why", "please explain how"]


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model(0))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
    (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
    (dict(temperature=-1.0), r"temperature must be 0 \(greedy\) or >= 0.0001, got -1.0"),
    (dict(temperature=1e-9), r"temperature must be 0 \(greedy\) or >= 0.0001"),
    (dict(temperature=NAN), "temperature must be a finite number"),
    (dict(temperature=INF), "temperature must be a finite number"),
    (dict(temperature="0.5"), "temperature must be a number, got '0.5'"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=None), "top_p must be a number"),
    (dict(top_k=-1), r"top_k must be >= 0 \(0 = off\), got -1"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(stop=("ok", "")), "stop strings must be non-empty strings"),
    (dict(logit_bias=[(5, 1.0)]), "logit_bias must be a mapping"),
    (dict(logit_bias={5: NAN}), r"logit_bias\[5\] must be a finite number"),
    (dict(logit_bias={"Sorry": "x"}), r"logit_bias\['Sorry'\] must be a number"),
    (dict(logit_bias={-3: 1.0}), "logit_bias key -3 must be a token id"),
    (dict(logit_bias={True: 1.0}), "logit_bias key True must be a token id"),
    (dict(logit_bias={" ": 1.0}), "logit_bias key ' ' must be a token id"),
    (dict(logit_bias={2.5: 1.0}), "logit_bias key 2.5 must be a token id"),
    (dict(ngram_penalties=3), "ngram_penalties must be a list of"),
    (dict(ngram_penalties=[(3,)]), r"ngram_penalties entries must be \(n, penalty\) pairs"),
    (dict(ngram_penalties=[(0, 1.0)]), "ngram_penalties: n must be >= 1"),
    (dict(ngram_penalties=[("a", 1.0)]), "ngram_penalties: n must be an integer"),
    (dict(ngram_penalties=[(3, NAN)]), "ngram_penalties: the penalty for n=3 must be a finite"),
    (dict(eos_id=2.0), "eos_id must be a token id"),
    (dict(eos_id="a"), "eos_id must be a token id"),
    (dict(eos_id=[2, "a"]), "eos_id must be an integer"),
    (dict(eos_id=[2, -1]), "eos_id -1 is not a token id"),
])
def test_each_bad_value_is_a_user_error_naming_the_field(kwargs, match):
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(UserError, match=match):
        SamplingSettings(**kwargs)


def test_values_are_stored_in_normal_form():
    s = SamplingSettings(max_new_tokens=np.int64(8), temperature=np.float32(0.5), top_p=1,
                         top_k=np.int32(3), stop="###", logit_bias={np.int64(5): 1, "Sorry": -100},
                         ngram_penalties=[[3, 1], (4, np.float32(2))], eos_id=np.int32(2))
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (8, 0.5, 1.0, 3)
    assert type(s.max_new_tokens) is int and type(s.temperature) is float
    assert s.stop == ("###",) and s.ngram_penalties == ((3, 1.0), (4, 2.0)) and s.eos_id == (2,)
    assert dict(s.logit_bias) == {5: 1.0, "Sorry": -100.0}
    assert [type(k) for k in s.logit_bias] == [int, str]
    with pytest.raises(TypeError):
        s.logit_bias[5] = 2.0  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 1.0
    assert SamplingSettings(max_new_tokens=1, eos_id=-1).eos_id == ()
    assert SamplingSettings(max_new_tokens=1).eos_id is None
    assert SamplingSettings(max_new_tokens=1, logit_bias=None).logit_bias == {}
    assert not SamplingSettings(max_new_tokens=1, temperature=0.7).greedy


def test_equal_settings_compare_and_hash_equal():
    a = SamplingSettings(max_new_tokens=4, stop=["x"], logit_bias={5: 1.0, 7: 2.0},
                         ngram_penalties=[(3, 1.0)])
    b = SamplingSettings(max_new_tokens=4, stop=("x",), logit_bias={7: 2, 5: 1},
                         ngram_penalties=((3, 1),))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != dataclasses.replace(a, top_k=3)
    with pytest.raises(UserError, match="top_k must be >= 0"):
        dataclasses.replace(a, top_k=-2)  # a replaced copy is validated too


def test_importing_the_settings_does_not_import_jax():
    import subprocess

    code = ("import sys; from dromedary_jax.sampling.settings import SamplingSettings; "
            "from dromedary_jax.pipeline.generator import ModelGenerator; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- from_config
def _section(**overrides):
    s = dict(max_new_tokens=24, temperature=1.0, top_p=0.98, logit_bias={"<eos>": -100.0},
             stop=("\n\nUser:",), batch_size=8, other_key="ignored")
    s.update(overrides)
    return ml_collections.ConfigDict(s)


def test_from_config_reads_the_usual_keys():
    s = SamplingSettings.from_config(_section(), "self_instruct.topics")
    assert s == SamplingSettings(max_new_tokens=24, temperature=1.0, top_p=0.98,
                                 logit_bias={"<eos>": -100.0}, stop=("\n\nUser:",))
    vc = _section(ngram_penalties=((3, 1.0), (4, 2.0)), logit_bias={}, top_k=40, stop=None)
    s = SamplingSettings.from_config(vc, "verbose_clone")
    assert s.ngram_penalties == ((3, 1.0), (4, 2.0)) and s.top_k == 40
    assert s.logit_bias == {} and s.stop == ()


@pytest.mark.parametrize("overrides,match", [
    (dict(temperature=-1.0), r"^config\.self_align\.temperature must be 0 \(greedy\) or >= "),
    (dict(max_new_tokens=0), r"^config\.self_align\.max_new_tokens must be >= 1"),
    (dict(top_p=2.0), r"^config\.self_align\.top_p must be in \(0, 1\]"),
    (dict(top_k=-1), r"^config\.self_align\.top_k must be >= 0"),
    (dict(stop=("",)), r"^config\.self_align\.stop strings must be non-empty"),
    (dict(logit_bias={"Sorry": NAN}), r"^config\.self_align\.logit_bias\['Sorry'\] must be a "),
    (dict(ngram_penalties=((0, 1.0),)), r"^config\.self_align\.ngram_penalties: n must be >= 1"),
    (dict(temperature=None), r"^config\.self_align\.temperature is missing"),
])
def test_from_config_errors_name_the_config_key(overrides, match):
    with pytest.raises(UserError, match=match):
        SamplingSettings.from_config(_section(**overrides), "self_align")


def test_from_config_missing_key():
    sec = _section()
    del sec["max_new_tokens"]
    with pytest.raises(UserError, match=r"^config\.self_instruct\.vanilla\.max_new_tokens is "
                                         r"missing"):
        SamplingSettings.from_config(sec, "self_instruct.vanilla")


# ----------------------------------------------------------------------------- the sampler
def test_generate_with_settings_equals_loose_keywords(model):
    kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=40, eos_id=-1,
              logit_bias={5: -100.0, 7: 2.0}, ngram_penalties=((2, 1.5),))
    want = dj.generate(model, PROMPTS, seed=3, **kw)
    s = SamplingSettings(**kw)
    assert dj.generate(model, PROMPTS, seed=3, settings=s) == want
    assert dj.generate(model, PROMPTS, seed=3, settings=s, engine="continuous",
                       batch_size=2) == want
    # "#<id>" keys are token ids for generate too
    s2 = dataclasses.replace(s, logit_bias={"#5": -100.0, 7: 2.0})
    assert dj.generate(model, PROMPTS, seed=3, settings=s2) == want


def test_generate_text_with_settings_equals_loose_keywords(model, sp_tokenizer):
    kw = dict(max_new_tokens=8, temperature=1.0, seed=2, stop=["e"], stop_check_every=3,
              shared_prefix="### User: hi\n", batch_size=2)
    sampling = dict(max_new_tokens=8, temperature=1.0, stop=["e"])
    want = dj.generate_text(model, sp_tokenizer, TEXTS, **kw)
    other = {k: v for k, v in kw.items() if k not in sampling}
    got = dj.generate_text(model, sp_tokenizer, TEXTS, settings=SamplingSettings(**sampling),
                           **other)
    assert got == want


def test_word_logit_bias_keys_need_a_tokenizer(model, sp_tokenizer):
    word = "sorry"
    ids = bias_by_token({word: -100.0, "<eos>": -5.0}, sp_tokenizer)
    assert ids[sp_tokenizer.eos_id] == -5.0 and len(ids) >= 2
    by_word = SamplingSettings(max_new_tokens=4, logit_bias={word: -100.0})
    by_id = SamplingSettings(max_new_tokens=4, logit_bias={
        i: -100.0 for i in bias_by_token({word: -100.0}, sp_tokenizer)})
    assert dj.generate_text(model, sp_tokenizer, TEXTS, settings=by_word) == \
        dj.generate_text(model, sp_tokenizer, TEXTS, settings=by_id)
    with pytest.raises(UserError, match="logit_bias key 'sorry' is a word .*use generate_text"):
        dj.generate(model, PROMPTS, settings=by_word)


def test_settings_and_loose_keywords_are_exclusive(model, sp_tokenizer):
    s = SamplingSettings(max_new_tokens=4)
    with pytest.raises(UserError, match=r"either settings= or the sampling keywords, not both "
                                        r"\(got settings= and temperature=\)"):
        dj.generate(model, PROMPTS, settings=s, temperature=0.5)
    with pytest.raises(UserError, match=r"not both \(got settings= and max_new_tokens=, stop=\)"):
        dj.generate_text(model, sp_tokenizer, TEXTS, settings=s, max_new_tokens=4, stop="x")
    # explicit default values count as given too
    with pytest.raises(UserError, match="not both"):
        dj.generate(model, PROMPTS, settings=s, eos_id=None)
    with pytest.raises(UserError, match=r"max_new_tokens is required \(or pass settings="):
        dj.generate(model, PROMPTS)
    with pytest.raises(UserError, match="settings must be a SamplingSettings, got dict"):
        dj.generate(model, PROMPTS, settings={"max_new_tokens": 4})
    with pytest.raises(UserError, match="settings.stop needs text"):
        dj.generate(model, PROMPTS, settings=SamplingSettings(max_new_tokens=4, stop="x"))
    # the rest of the call is still checked with settings
    with pytest.raises(UserError, match="seed must be an integer"):
        dj.generate(model, PROMPTS, settings=s, seed="x")
    with pytest.raises(UserError, match=r"max_new_tokens must be at most 4x"):
        dj.generate(model, PROMPTS, settings=SamplingSettings(max_new_tokens=10**6))


def test_public_signatures_keep_their_keywords():
    for fn, names in ((dj.generate, ["max_new_tokens", "temperature", "top_p", "top_k", "eos_id",
                                     "seed", "ids", "logit_bias", "ngram_penalties",
                                     "shared_prefix", "prefix_cache", "batch_size", "progress",
                                     "compile_only", "engine", "settings", "on_result"]),
                      (dj.generate_text, ["max_new_tokens", "temperature", "top_p", "top_k",
                                          "stop", "logit_bias", "seed", "ids", "shared_prefix",
                                          "eos_id", "ngram_penalties", "prefix_cache",
                                          "batch_size", "stop_check_every", "progress", "engine",
                                          "settings", "on_result"])):
        params = inspect.signature(fn).parameters
        assert [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY] == names
        assert repr(params["temperature"].default) == "0.0"  # reads as before
        assert repr(params["top_p"].default) == "1.0"


# ----------------------------------------------------------------------------- generators
def test_model_generator_passes_the_settings(model, sp_tokenizer):
    s = SamplingSettings(max_new_tokens=8, temperature=0.5, top_p=0.95, stop=("e",),
                         logit_bias={"sorry": -100.0, "<eos>": -5.0, "#7": 2.0})
    ids = ["a", "b", "c"]
    gen = ModelGenerator(model, sp_tokenizer, batch_size=2, top_k=30)
    got = gen.generate(TEXTS, ids=ids, settings=s, seed=4)
    want = dj.generate_text(model, sp_tokenizer, TEXTS, settings=dataclasses.replace(s, top_k=30),
                            seed=4, ids=ids, batch_size=2)
    assert got == want
    # as the loose keywords give them
    assert dj.generate_text(model, sp_tokenizer, TEXTS, seed=4, ids=ids, batch_size=2,
                            max_new_tokens=8, temperature=0.5, top_p=0.95, top_k=30,
                            stop=("e",), logit_bias=dict(s.logit_bias)) == got
    cont = ModelGenerator(model, sp_tokenizer, batch_size=2, top_k=30, engine="continuous")
    assert cont.generate(TEXTS, ids=ids, settings=s, seed=4) == got
    with pytest.raises(UserError, match="engine must be one of"):
        ModelGenerator(model, sp_tokenizer, engine="vllm")
    with pytest.raises(UserError, match="settings must be a SamplingSettings"):
        gen.generate(TEXTS, ids=ids, settings={"max_new_tokens": 4})
    assert gen.generate([], ids=[], settings=s) == []


def test_scripted_generator_takes_settings_or_keywords():
    g = ScriptedGenerator()
    p = ["x\n1. Alpha\n", "y\n1. Beta\n"]
    s = SamplingSettings(max_new_tokens=16, stop=("\n",))
    got = g.generate(p, ids=["a", "b"], settings=s, seed=3)
    assert got == g.generate(p, ids=["a", "b"], max_new_tokens=16, stop=("\n",), seed=3)
    assert all("\n" not in t and len(t) <= 64 for t in got)
    with pytest.raises(UserError, match="not both"):
        g.generate(p, ids=["a", "b"], settings=s, max_new_tokens=16)


def test_generate_into_passes_settings(tmp_path):
    from dromedary_jax.pipeline.generation import generate_into
    from dromedary_jax.pipeline.records import Hosts, StageDir

    seen = []

    class Fake:
        def generate(self, prompts, *, ids, settings, shared_prefix=None, seed=0):
            seen.append(settings)
            return [p.upper() for p in prompts]

    s = SamplingSettings(max_new_tokens=3)
    stage = StageDir(str(tmp_path), "st", {"a": 1}, Hosts()).open()
    items = [{"id": f"i{k}", "prompt": "p" * k} for k in range(3)]
    n = generate_into(stage, "r", items, Fake(), batch_size=2, seed=0, settings=s,
                      make_record=lambda it, text: {"id": it["id"], "text": text})
    assert n == 3 and seen == [s, s]
    with pytest.raises(TypeError, match="settings"):
        generate_into(stage, "r2", items, Fake(), batch_size=2, seed=0,
                      make_record=lambda it, text: {})
