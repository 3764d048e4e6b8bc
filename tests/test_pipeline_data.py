"""The project's data files, the loaders (ours and the original formats) and prompt ablations."""
import json
import os
import re

import pytest

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.defaults import get_defaults
from dromedary_jax.pipeline.principles import (build_prompt, cited_principles, load_exemplars, load_principles,
                                               parse_original_prompt, question_suffix, spec_from_files)

PAPER_NAMES = ["ethical", "informative", "helpful", "question assessment", "reasoning", "multi-aspect",
               "candor", "knowledge recitation", "static", "clarification", "numerical sensitivity",
               "dated knowledge", "step-by-step", "balanced & informative perspectives", "creative",
               "operational"]


def our_spec():
    return spec_from_files("data/templates/self_align.txt", "data/principles/dromedary16.json",
                           "data/exemplars/dromedary5.json")


def test_our_principles_and_exemplars():
    principles = load_principles("data/principles/dromedary16.json")
    assert [p.key for p in principles] == PAPER_NAMES
    exemplars, feedback = load_exemplars("data/exemplars/dromedary5.json")
    assert [e.name for e in exemplars] == ["future_question", "unknown_person", "multi_turn_task",
                                           "real_time_information", "ordinary_knowledge"]
    assert feedback
    for e in exemplars:
        assert "(internal thoughts)" in e.text and "{cites:" in e.text and e.leak_markers
        cited = re.findall(r"\{cites:([^}]*)\}", e.text)
        assert all(k in PAPER_NAMES for group in cited for k in group.split("|"))
    assert exemplars[2].text.count("(internal thoughts)") == 2  # the multi-turn one


def test_red_team_types_and_seed_tasks():
    seeds = D.load_red_team_seeds("data/red_team/question_types.jsonl")
    assert len(seeds) == 20 and len(D.question_types(seeds)) == 20
    tasks = D.load_seed_tasks("data/seed_tasks/seed_tasks.jsonl")
    assert len(tasks) >= 100
    raw = [json.loads(line) for line in open(os.path.join(D.REPO_ROOT, "data/seed_tasks/seed_tasks.jsonl"))]
    for r in raw:
        assert set(r) == {"id", "name", "instruction", "instances", "is_classification"}
        assert r["instances"] and set(r["instances"][0]) == {"input", "output"} and r["instances"][0]["output"]
    assert len({r["id"] for r in raw}) == len(raw) and len({r["name"] for r in raw}) == len(raw)
    assert any(r["is_classification"] for r in raw) and not all(r["is_classification"] for r in raw)


def test_templates_named_and_positional():
    t = D.Template.load("data/templates/topic_brainstorm.txt", "k", ("question_type", "num_topics"))
    text = t.render(question_type="Questions about X", num_topics=10)
    assert "Questions about X" in text and "{" not in text and not t.positional
    p = D.Template.from_text("Hints:\n{}\n\nOut:\n{}\nkeep {braces}", ("hints", "examples"))
    assert p.positional
    assert p.render(hints="H", examples="E") == "Hints:\nH\n\nOut:\nE\nkeep {braces}"
    with pytest.raises(UserError, match="config.k"):
        D.Template.from_text("{} {} {}", ("a", "b"), key="k")


def test_prompt_render_and_ablations():
    spec = our_spec()
    full = build_prompt(spec, assistant="Watson", cutoff="Sept 2021")
    assert full.prefix.endswith("User:") and "{" not in full.prefix
    assert full.numbering == {k: i + 1 for i, k in enumerate(PAPER_NAMES)}
    assert "follow principles 3 (helpful), 7 (candor), 12 (dated knowledge)." in full.prefix

    dropped = build_prompt(spec, assistant="Watson", drop=("candor",))
    assert "(candor)" not in dropped.prefix and len(dropped.numbering) == 15
    assert dropped.numbering["dated knowledge"] == 11
    assert "follow principles 3 (helpful), 11 (dated knowledge)." in dropped.prefix

    s1 = build_prompt(spec, assistant="W", shuffle_seed=1)
    assert s1.prefix == build_prompt(spec, assistant="W", shuffle_seed=1).prefix
    assert s1.numbering != full.numbering and sorted(s1.numbering) == sorted(full.numbering)
    for group in re.findall(r"follow principles ([^.]*)\.", s1.prefix):  # citations renumbered
        for n, k in re.findall(r"(\d+) \(([^)]+)\)", group):
            assert s1.numbering[k] == int(n)

    for n in range(6):
        r = build_prompt(spec, assistant="W", num_exemplars=n)
        assert r.prefix.count("(internal thoughts):") == n + (n >= 3)  # exemplar 3 has two turns
        assert r.prefix.endswith("User:")
    with pytest.raises(UserError, match="num_exemplars"):
        build_prompt(spec, assistant="W", num_exemplars=6)
    with pytest.raises(UserError, match="drop_principles"):
        build_prompt(spec, assistant="W", drop=("nonexistent",))


def test_citation_parsing_and_suffix():
    numbering = {k: i + 1 for i, k in enumerate(PAPER_NAMES)}
    t = "Here the relevant ones are 3 (helpful), 7 (Candor), 12 (dated knowledge) and 99 (made up), 9 (wrong name)."
    assert cited_principles(t, numbering) == ["helpful", "candor", "dated knowledge", "static"]
    assert question_suffix("What is 2+2?", "", "Watson") == " What is 2+2?\n\nWatson (internal thoughts):"
    assert question_suffix("Sort:", "3, 1", "W") == " Sort:\n\n3, 1\n\nW (internal thoughts):"


def test_assistant_and_questions(tmp_path):
    c = get_defaults()
    a = D.load_assistant(c.data)
    assert (a.name, a.prompt_name) == ("Dromedary", "Watson") and a.cutoff
    c.data.assistant_name = "Bactrian"
    assert D.load_assistant(c.data, "Sage").name == "Bactrian"
    c.data.assistant_name = "bad{name}"
    with pytest.raises(UserError, match="data.assistant_name"):
        D.load_assistant(c.data)
    p = tmp_path / "q.json"
    p.write_text(json.dumps([{"instruction": "A?", "input": ""}, {"instruction": "B?", "input": "x"}]))
    qs = D.load_question_file(str(p))
    assert [q["id"] for q in qs] == ["q-0000000", "q-0000001"] and qs[1]["input"] == "x"
    assert D.load_question_file("data/red_team/question_types.jsonl")[0]["instruction"].endswith("?")
    with pytest.raises(UserError, match="self_align.questions_file"):
        D.load_question_file(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ original Dromedary files

def test_original_self_align_prompt_round_trips(reference_dir):
    for rel, n_rules, n_ex in (("watson_self_align_prompt.txt", 16, 5),
                               ("main_dromedary2/watson_self_align_prompt.txt", 17, 6)):
        path = os.path.join(reference_dir, rel)
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read().strip()
        spec = parse_original_prompt(text)
        assert len(spec.principles) == n_rules and len(spec.exemplars) == n_ex
        assert build_prompt(spec, assistant="Watson").prefix == text  # byte for byte
        ab = build_prompt(spec, assistant="Watson", drop=("helpful",), num_exemplars=2)
        assert "(helpful)" not in ab.prefix and ab.prefix.count("(auto reply)") == 2
        assert "2 (candor)" in ab.prefix or "6 (candor)" in ab.prefix  # renumbered citation
        renamed = build_prompt(spec, assistant="Camel")
        assert "Watson" not in renamed.prefix and "Camel (internal thoughts)" in renamed.prefix


def test_original_stage1_files_load(reference_dir):
    seeds = D.load_red_team_seeds(os.path.join(reference_dir, "tgrt_self_instruct_seed_questions.jsonl"))
    assert len(D.question_types(seeds)) == 20
    tasks = D.load_seed_tasks(os.path.join(reference_dir, "self_instruct_seed_tasks.jsonl"))
    assert len(tasks) == 175 and all(t["instruction"] for t in tasks)
    topic = D.Template.load(os.path.join(reference_dir, "tgrt_self_instruct_topic_brainstorm_prompt.txt"), "k",
                            ("question_type", "num_topics"))
    assert topic.positional and "Questions that require X" in topic.render(question_type="Questions that require X",
                                                                            num_topics=10)
    q = D.Template.load(os.path.join(reference_dir, "tgrt_self_instruct_question_generation_prompt.txt"), "k",
                        ("hints", "examples", "num"))
    out = q.render(hints="\nHINTS", examples="\nEXAMPLES", num=10)
    assert out.index("HINTS") < out.index("EXAMPLES")
    vanilla = D.Template.load(os.path.join(reference_dir, "self_instruct_prompt.txt"), "k", ("num_tasks",))
    assert vanilla.render(num_tasks=20).rstrip().endswith(":")


def test_complete_fills_defaults_and_names_bad_keys():
    import ml_collections

    from dromedary_jax.pipeline.defaults import complete

    c = complete(ml_collections.ConfigDict({"self_align": {"num_exemplars": 2, "logit_bias": {"Nope": -1.0}},
                                            "training": {"lr": 1e-4}}))
    assert c.self_align.num_exemplars == 2 and c.self_align.top_p == 0.95 and c.training.lr == 1e-4
    assert dict(c.self_align.logit_bias) == {"Nope": -1.0}  # free-form dict replaced, not merged
    with pytest.raises(UserError, match=r"config\.self_instruct\.vanilla\.rouge_treshold: unknown key"):
        complete(ml_collections.ConfigDict({"self_instruct": {"vanilla": {"rouge_treshold": 0.5}}}))
    with pytest.raises(UserError, match=r"config\.self_align\.top_p"):
        complete(ml_collections.ConfigDict({"self_align": {"top_p": 0.0}}))
    c = complete(ml_collections.ConfigDict({"self_align": {"drop_principles": ["candor"]}}))
    assert tuple(c.self_align.drop_principles) == ("candor",)
