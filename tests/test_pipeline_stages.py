"""Stages 1-2 with the scripted fake model: parsing, filters, dedup, determinism, hosts, resume
after a real SIGKILL, config lock, runner and CLI."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline.stages import self_align as S2
from dromedary_jax.pipeline.stages import self_instruct as S1
from dromedary_jax.pipeline.principles import build_prompt
from dromedary_jax.distributed import Hosts
from dromedary_jax.pipeline.records import read_shards
from dromedary_jax.pipeline.resources import Resources
from dromedary_jax.testing.scripted import ScriptedGenerator
from dromedary_jax.run import run_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arg="scripted"):
    spec = importlib.util.spec_from_file_location("stages12_tiny", os.path.join(ROOT, "configs", "stages12_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def all_records(workdir):
    out = {}
    for stage, names in (("self_instruct", ("topics", "questions", "vanilla")), ("self_align", ("responses",))):
        for name in names:
            out[f"{stage}/{name}"] = read_shards(os.path.join(workdir, stage), name)
    return out


def derived(workdir):
    files = ("self_instruct/prompts.jsonl", "self_instruct/candidates.jsonl", "self_instruct/topics.jsonl",
             "self_align/kept.jsonl", "self_align/funnel.md", "self_instruct/funnel.md")
    return {f: open(os.path.join(workdir, f)).read() for f in files}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-host run of configs/stages12_tiny.py (scripted)."""
    wd = str(tmp_path_factory.mktemp("ref"))
    counts = run_stages(tiny_config(), wd)
    return wd, counts


# ------------------------------------------------------------------ parsers on realistic text

def test_parse_topics():
    text = "6. Solar Energy\n7. street food markets and vendors\n8. Ancient Trade.\n9. rural schools\n10. \n11. Tax"
    acc, rej = S1.parse_topics(text, max_topics=10, max_words=3)
    assert acc == ["Solar Energy", "Tax"]
    assert [r[1] for r in rej] == ["too_long", "trailing_punctuation", "not_capitalized", "empty"]
    pool, unique = S1.normalize_topics({"A": ["X", "x", "Y", "Z"], "B": ["P", "Q"]})
    assert unique == 5 and pool == {"A": ["X", "Y"], "B": ["P", "Q"]}


def test_parse_questions_keeps_only_expected_hints():
    expected = [["6. type: Future, topic: Mars", "Future", "Mars"], ["7. type: Law, topic: Art", "Law", "Art"]]
    text = ("6. type: Future, topic: Mars, instruction: Who will walk on Mars first?\n"
            "7. type: Law, topic: Arts, instruction: Is art legal?\n"        # not the hint's topic
            "9. type: Law, topic: Art, instruction: Off by number?\n"
            "7. type: Law, topic: Art, instruction: Can I sue a painter?\n"
            "8. type: Law, topic: Tax, instru")                               # cut off
    qs, rej = S1.parse_questions(text, expected)
    assert [(q["topic"], q["instruction"]) for q in qs] == [("Mars", "Who will walk on Mars first?"),
                                                            ("Art", "Can I sue a painter?")]
    assert sorted(r[1] for r in rej) == ["off_hint", "off_hint", "truncated"]


def test_vanilla_prompt_and_parse():
    prompt = S1.encode_vanilla_prompt("Make tasks.", [{"instruction": "Add  2 and 3:", "input": ""},
                                                      {"instruction": "Sort", "input": "b, a"}])
    assert prompt.endswith("###\n1. Instruction: Add 2 and 3\n1. Input:\n<noinput>\n###\n2. Instruction: Sort\n"
                           "2. Input:\nb, a\n###\n3. Instruction:")
    gen = (" Name three rivers in Africa.\n3. Input:\n<noinput>\n###\n4. Instruction: Fix the grammar.\n4. Input:\n"
           "He go home.\n###\n5. Instruction: broken piece\n###\n6. Instruction: Cut off by the token li")
    out = S1.parse_vanilla(gen, 2)
    assert [(c["instruction"], c["input"], c["malformed"]) for c in out] == [
        ("Name three rivers in Africa.", "", False), ("Fix the grammar.", "He go home.", False),
        ("5. Instruction: broken piece", "", True)]


def _cleaner(**kw):
    from dromedary_jax.pipeline.principles import spec_from_files

    spec = spec_from_files("data/templates/self_align.txt", "data/principles/dromedary16.json",
                           "data/exemplars/dromedary5.json")
    rendered = build_prompt(spec, assistant="Watson", cutoff="2021")
    args = dict(prompt=rendered, prompt_name="Watson", assistant_name="Dromedary", min_answer_chars=20,
                leak_markers=("User:", "(auto reply)"), apology_prefixes=("I'm sorry",))
    args.update(kw)
    return S2.Cleaner(**args)


def test_cleaner_parses_cleans_and_filters():
    c = _cleaner()
    ok = c.process(" The user asks about tides. I should follow principles 2 (informative), 13 (step-by-step)."
                   "\n\nWatson: Tides come from the Moon's gravity. Watson is happy to explain more. The Sun "
                   "adds a smaller pull.\n\nUser: thanks\n\nWatson (auto reply): You're welcome!", "Why tides?")
    assert ok["filter"] is None and ok["cited_principles"] == ["informative", "step-by-step"]
    assert ok["answer"] == ("Tides come from the Moon's gravity. Dromedary is happy to explain more. "
                            "The Sun adds a smaller pull.")
    assert ok["cleaning"]["cut_user_turn"] and ok["cleaning"]["renamed"]
    loop = c.process(" Thoughts.\n\nWatson: One fact here. Second fact here. One fact here. Second fact here.", "q")
    assert loop["answer"] == "One fact here. Second fact here." and loop["cleaning"]["cut_repeat"]
    cut = c.process(" Thoughts.\n\nWatson: A complete first sentence here. And then the text stops mid", "q")
    assert cut["answer"] == "A complete first sentence here." and cut["cleaning"]["trimmed"]
    assert c.process(" only thinking, no answer", "q")["filter"] == "no_answer"
    assert c.process("\n\nWatson: answer without thoughts", "q")["filter"] == "no_thoughts"
    assert c.process(" T.\n\nWatson: ", "q")["filter"] == "empty"
    assert c.process(" T.\n\nWatson: Yes.", "q")["filter"] == "too_short"
    assert c.process(" T.\n\nWatson: I'm sorry, but I cannot help with that request.", "q")["filter"] == "apology"
    leak = " T.\n\nWatson: Forager bees carry it home in the honey crop, that is all I can say here."
    assert c.process(leak, "How do plants grow?")["filter"] == "exemplar_leak"
    assert c.process(leak, "What is a honey crop?")["filter"] is None  # marker is in the question
    # an ordinary answer on an exemplar's topic is no leak (the markers are the exemplars' own)
    on_topic = (" T.\n\nWatson: Bees turn nectar into honey; for travel money, compare the exchange "
                "rate your bank offers, and note that 98.6 F is 37 C.")
    assert c.process(on_topic, "Tell me three facts.")["filter"] is None
    copied = (" T.\n\nWatson: Squads, form and even the host country can change a lot over a decade, so "
              "predictions this far ahead are mostly guesswork.")
    assert c.process(copied, "Who wins the next chess final?")["filter"] == "exemplar_leak"


def test_scripted_generator_is_deterministic_per_id():
    g = ScriptedGenerator()
    p = ["x\n1. Alpha\n", "y\n1. Beta\n", "z\n1. Gamma\n"]
    a = g.generate(p, ids=["a", "b", "c"], max_new_tokens=64, seed=3)
    b = g.generate(p[::-1], ids=["c", "b", "a"], max_new_tokens=64, seed=3)
    assert a == b[::-1]
    assert g.generate(p[:1], ids=["a"], max_new_tokens=64, seed=4) != a[:1]
    assert g.generate(p[:1], ids=["a"], max_new_tokens=64, stop=("\n",), seed=3)[0] == a[0].split("\n")[0]


# ------------------------------------------------------------------ whole stages

def test_end_to_end_outputs(reference_run):
    wd, counts = reference_run
    si, sa = counts["self_instruct"], counts["self_align"]
    assert si["tgrt_kept"] > 0 and si["vanilla_kept"] >= 30 and si["prompts"] == si["tgrt_kept"] + si["vanilla_kept"]
    assert {"rouge_similar", "blacklist", "too_short"} <= set(si["filtered"])
    cands = [json.loads(x) for x in open(os.path.join(wd, "self_instruct/candidates.jsonl"))]
    assert {c["filter"] for c in cands} <= {None, *S1.VANILLA_REASONS, *S1.MERGE_REASONS}
    prompts = [json.loads(x) for x in open(os.path.join(wd, "self_instruct/prompts.jsonl"))]
    assert len({p["id"] for p in prompts}) == len(prompts) == si["prompts"]
    assert len({p["question_type"] for p in prompts if p["source"] == "tgrt"}) > 5  # types mixed
    recs = read_shards(os.path.join(wd, "self_align"), "responses")
    assert len(recs) == sa["generated"] == 48
    for r in recs:
        assert {"id", "prompt_id", "prefix_id", "question", "raw", "thoughts", "answer", "cited_principles",
                "filter"} <= set(r)
    assert sa["kept"] == sum(r["filter"] is None for r in recs) > 0
    assert {"exemplar_leak", "apology", "no_answer"} <= set(sa["filtered"])
    assert sa["citations"] and sa["cleaning"]["renamed"] > 0
    kept = [json.loads(x) for x in open(os.path.join(wd, "self_align/kept.jsonl"))]
    assert len(kept) == sa["kept"] and all("Watson" not in k["output"] for k in kept)
    assert any("Dromedary" in k["output"] for k in kept)
    for stage in ("self_instruct", "self_align"):
        m = json.load(open(os.path.join(wd, stage, "manifest.json")))
        assert m["done"] and m["config_hash"] and os.path.exists(os.path.join(wd, stage, "funnel.png"))


class SpyGenerator(ScriptedGenerator):
    def __init__(self):
        super().__init__()
        self.prefixes = []

    def generate(self, prompts, **kw):
        self.prefixes.append(kw.get("shared_prefix"))
        return super().generate(prompts, **kw)


def test_batch_size_does_not_change_results_and_prefix_is_shared(tmp_path, reference_run):
    c = tiny_config()
    c.self_instruct.batch_size = 3
    c.self_align.batch_size = 5
    spy = SpyGenerator()
    run_stages(c, str(tmp_path), resources=Resources(c, generator=spy, hosts=Hosts()))
    assert all_records(str(tmp_path)) == all_records(reference_run[0])
    assert derived(str(tmp_path)) == derived(reference_run[0])
    prefixes = [p for p in spy.prefixes if p]
    assert len(prefixes) == 10 and len(set(prefixes)) == 1 and prefixes[0].endswith("User:")


def test_threaded_two_hosts_equal_one_host(tmp_path, reference_run):
    """Two hosts (threads with a real barrier) write their own shards; same records overall."""
    c = tiny_config()
    barrier = threading.Barrier(2, timeout=60)
    errors = []

    def host(i):
        try:
            hosts = Hosts(i, 2, barrier=lambda name: barrier.wait())
            run_stages(c, str(tmp_path), resources=Resources(c, generator=ScriptedGenerator(), hosts=hosts))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert os.path.exists(os.path.join(tmp_path, "self_align", "responses-00001-of-00002.jsonl"))
    assert all_records(str(tmp_path)) == all_records(reference_run[0])
    assert derived(str(tmp_path)) == derived(reference_run[0])


def test_rerun_skips_and_different_config_is_refused(tmp_path):
    c = tiny_config()
    c.self_instruct.vanilla.num_instructions = 5
    c.self_align.max_questions = 6
    wd = str(tmp_path)
    run_stages(c, wd)
    gen = ScriptedGenerator()
    run_stages(c, wd, resources=Resources(c, generator=gen, hosts=Hosts()))
    assert gen.calls == 0  # both stages done under the same config: skipped
    c.self_align.drop_principles = ("candor",)
    with pytest.raises(UserError, match="different config"):
        run_stages(c, wd, stages=["self_align"])
    c.overwrite = True
    out = run_stages(c, wd, stages=["self_align"])["self_align"]
    assert out["generated"] == 6 and "candor" not in out["citations"]
    prefix_file = [f for f in os.listdir(os.path.join(wd, "self_align")) if f.startswith("prefix-")]
    assert prefix_file and "(candor)" not in open(os.path.join(wd, "self_align", prefix_file[-1])).read()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A small finished stages 1-2 run (copied by the tests that change it)."""
    c = tiny_config()
    c.self_instruct.vanilla.num_instructions = 5
    c.self_align.max_questions = 6
    wd = str(tmp_path_factory.mktemp("small") / "wd")
    run_stages(c, wd, report=False)
    return c, wd


def _copy(small_run, tmp_path):
    import copy
    import shutil

    c, wd = small_run
    dst = str(tmp_path / "wd")
    shutil.copytree(wd, dst)
    return copy.deepcopy(c), dst


def test_bookkeeping_model_keys_do_not_lock_finished_stages(small_run, tmp_path):
    c, wd = _copy(small_run, tmp_path)
    c.model.remat, c.model.mesh, c.model.progress, c.model.batch_size = "full", (1, -1, 1), True, 3
    c.model.delay_s = 0.01
    c.self_instruct.batch_size, c.self_align.batch_size = 2, 3
    gen = ScriptedGenerator()
    run_stages(c, wd, resources=Resources(c, generator=gen, hosts=Hosts()), report=False)
    assert gen.calls == 0  # both stages still done: skipped, not refused


def test_each_stage_reads_its_inputs_once_per_run(small_run, tmp_path, monkeypatch):
    """The runner builds a stage's folder (and reads its inputs) once: for the status line and
    the run alike."""
    from dromedary_jax.pipeline.runner import STAGES

    c, wd = _copy(small_run, tmp_path)
    c.self_align.max_questions = 7  # stage 2 runs again (overwrite); stage 1 is skipped
    c.overwrite = True
    reads = []
    for name in ("self_instruct", "self_align"):
        cls = type(STAGES[name])
        inner = cls.read_inputs
        monkeypatch.setattr(cls, "read_inputs",
                            lambda self, *a, _inner=inner, **k: reads.append(self.name) or
                            _inner(self, *a, **k))
    out = run_stages(c, wd, report=False)
    assert out["self_align"]["generated"] == 7
    assert reads == ["self_instruct", "self_align"]


def test_failed_first_run_does_not_lock_the_corrected_rerun(tmp_path):
    c = tiny_config()
    c.self_instruct.vanilla.num_instructions = 5
    c.model.kind, c.model.checkpoint = "checkpoint", str(tmp_path / "nope")
    wd = str(tmp_path / "wd")
    with pytest.raises(UserError, match=r"config\.model\.checkpoint=.*nope: does not exist"):
        run_stages(c, wd, stages=["self_instruct"], report=False)
    assert not os.path.exists(os.path.join(wd, "self_instruct"))  # checked before any stage runs
    c.model.kind, c.model.checkpoint = "scripted", ""
    out = run_stages(c, wd, stages=["self_instruct"], report=False)["self_instruct"]
    assert out["prompts"] > 0


def test_changed_config_is_not_reported_done(small_run, tmp_path, capsys):
    from dromedary_jax.pipeline.defaults import complete
    from dromedary_jax.pipeline.dry_run import stage_plan

    c, wd = _copy(small_run, tmp_path)
    plan = stage_plan(complete(c), wd, ["self_instruct", "self_align"])
    assert all("[done (skip)]" in line for line in plan), plan
    c.self_instruct.vanilla.num_instructions = 7
    plan = stage_plan(complete(c), wd, ["self_instruct", "self_align"])
    assert "[done, but the config changed: refused unless --config.overwrite/force]" in plan[0], plan
    assert "[done (skip)]" in plan[1], plan
    capsys.readouterr()
    with pytest.raises(UserError, match="different config"):
        run_stages(c, wd, report=False)
    out = capsys.readouterr().out
    assert "already done, skipped" not in out and "self_instruct: done under a different config: refused" in out


def test_stage2_without_stage1_names_the_key(tmp_path):
    with pytest.raises(UserError, match="self_align.questions_file"):
        run_stages(tiny_config(), str(tmp_path), stages=["self_align"])


# ------------------------------------------------------------------ CLI and a real kill

def _cli(workdir, *extra, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "dromedary_jax.run", "--config", "configs/stages12_tiny.py",
                        "--workdir", workdir, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_cli_bad_config_is_one_line_error(tmp_path):
    p = _cli(str(tmp_path), "--config.self_align.num_exemplars=9", "--stages", "self_align", check=False)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "config.self_align" in err[0], p.stderr[-2000:]
    p = _cli(str(tmp_path), "--stages", "nope", check=False)
    assert p.returncode == 2 and "error: --stages: unknown stage" in p.stderr
    p = _cli(str(tmp_path), "--config.self_align.temprature=1", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert ('error: config.self_align.temprature: unknown key (Did you mean "temperature"'
            in p.stderr), p.stderr[-2000:]
    p = _cli(str(tmp_path), "--config.no_section.x=1", check=False)
    assert p.returncode == 2 and "error: config.no_section: unknown key" in p.stderr
    assert "Traceback" not in p.stderr


def _lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def _run_until_then_kill(workdir, shard, min_lines):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "dromedary_jax.run", "--config", "configs/stages12_tiny.py",
                             "--workdir", workdir, "--config.model.delay_s=0.04"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while _lines(os.path.join(workdir, shard)) < min_lines:
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "timed out waiting for records"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, reference_run):
    wd = str(tmp_path)
    # killed in stage 1 (vanilla rounds), then in stage 2, then run to the end
    _run_until_then_kill(wd, "self_instruct/vanilla-00000-of-00001.jsonl", 10)
    assert not os.path.exists(os.path.join(wd, "self_instruct", "manifest.json"))
    _run_until_then_kill(wd, "self_align/responses-00000-of-00001.jsonl", 12)
    done = _lines(os.path.join(wd, "self_align/responses-00000-of-00001.jsonl"))
    assert 12 <= done < 48 and not os.path.exists(os.path.join(wd, "self_align", "manifest.json"))
    _cli(wd)
    assert all_records(wd) == all_records(reference_run[0])
    assert derived(wd) == derived(reference_run[0])
    for path in ("self_instruct/vanilla-00000-of-00001.jsonl", "self_align/responses-00000-of-00001.jsonl"):
        ids = [json.loads(x)["id"] for x in open(os.path.join(wd, path))]
        assert len(ids) == len(set(ids))  # nothing duplicated on disk either


def test_original_dromedary_files_through_both_stages(tmp_path, reference_dir):
    """A config pointing at the original prompt/seed files runs both stages (scripted model)."""
    c = tiny_config()
    si, ref = c.self_instruct, lambda name: os.path.join(reference_dir, name)
    si.red_team_seeds = ref("tgrt_self_instruct_seed_questions.jsonl")
    si.seed_tasks = ref("self_instruct_seed_tasks.jsonl")
    si.topic_template = ref("tgrt_self_instruct_topic_brainstorm_prompt.txt")
    si.question_template = ref("tgrt_self_instruct_question_generation_prompt.txt")
    si.vanilla_template = ref("self_instruct_prompt.txt")
    si.vanilla.num_instructions = 10
    c.self_align.prompt_file = ref("watson_self_align_prompt.txt")
    c.self_align.max_questions = 16
    spy = SpyGenerator()
    counts = run_stages(c, str(tmp_path), resources=Resources(c, generator=spy, hosts=Hosts()))
    assert counts["self_instruct"]["tgrt_kept"] > 0 and counts["self_instruct"]["vanilla_kept"] >= 10
    q = read_shards(os.path.join(tmp_path, "self_instruct"), "questions")[0]
    assert "20 Hints:\n\n1. type: " in q["prompt"]  # the original scripts' layout
    assert spy.prefixes[-1] == open(ref("watson_self_align_prompt.txt")).read().strip()
    assert counts["self_align"]["generated"] == 16 and counts["self_align"]["kept"] > 0


def test_parse_topics_capitalizes_when_asked():
    text = "2. sports\n3. Marine law\n4. **bold**"
    acc, rej = S1.parse_topics(text, max_topics=10, max_words=3, capitalize=True)
    assert acc == ["Sports", "Marine law"] and [r[1] for r in rej] == ["not_capitalized"]


def test_question_prompts_one_per_prompt_end_in_the_hint_line():
    """With one_per_prompt each new hint is its own prompt that ends in the hint's line up to
    "instruction:", and the continuation parses as that hint's question (real small models
    wrote their own hint lines and every question was rejected as off_hint)."""
    import ml_collections

    from dromedary_jax.pipeline import data_files as D

    seeds = [{"question_type": "Future", "topic": "Mars", "question": "Who will land first?"},
             {"question_type": "Law", "topic": "Rent", "question": "Can I sue?"}]
    pool = {"Future": ["Mars", "Moon"], "Law": ["Rent", "Tax"]}
    template = D.Template.from_text("Hints:\n{hints}\n\nRequests:\n{examples}",
                                    ("hints", "examples", "num"))
    q = ml_collections.ConfigDict(dict(hints_per_prompt=2, examples_per_prompt=1, max_prompts=0,
                                       one_per_prompt=True))
    items = S1.question_prompts(template, pool, ["Future", "Law"], seeds, q, seed=0)
    assert len(items) == 4 and all(len(it["expected"]) == 1 for it in items)
    it = items[0]
    assert it["prompt"].endswith(it["expected"][0][0] + ", instruction:")
    qs, rej = S1.parse_questions(it["prefill"] + " When will people live on Mars?",
                                 it["expected"])
    assert [x["instruction"] for x in qs] == ["When will people live on Mars?"] and not rej


class _StreamingScripted(ScriptedGenerator):
    """The scripted generator as a streaming one (like ModelGenerator with the continuous
    engine): one call per stage step, each text handed to ``on_result`` as it is made, in
    reverse order (a refill engine finishes rows out of order); ``die_after`` results into a
    call it raises (a kill in the middle of the step)."""

    streams = True

    def __init__(self, die_after=None):
        super().__init__()
        self.die_after, self.sizes = die_after, []

    def generate(self, prompts, *, ids, on_result=None, progress=None, **kw):
        texts = super().generate(prompts, ids=ids, **kw)
        self.sizes.append(len(prompts))
        for n, i in enumerate(reversed(range(len(texts)))):
            if self.die_after is not None and n == self.die_after:
                raise KeyboardInterrupt
            on_result(i, texts[i])
        return texts


def test_streamed_rows_survive_a_kill_and_the_resume_equals_the_reference(tmp_path, reference_run):
    c, wd = tiny_config(), str(tmp_path)
    run_stages(c, wd, stages=["self_instruct"], report=False)
    killer = _StreamingScripted(die_after=7)
    with pytest.raises(KeyboardInterrupt):
        run_stages(c, wd, stages=["self_align"], report=False,
                   resources=Resources(c, generator=killer, hosts=Hosts()))
    shard = "self_align/responses-00000-of-00001.jsonl"
    assert killer.sizes == [48] and _lines(os.path.join(wd, shard)) == 7  # kept up to the kill
    rest = _StreamingScripted()
    run_stages(c, wd, stages=["self_align"], report=False,
               resources=Resources(c, generator=rest, hosts=Hosts()))
    assert rest.sizes == [48 - 7]
    assert all_records(wd) == all_records(reference_run[0])
    assert derived(wd) == derived(reference_run[0])
