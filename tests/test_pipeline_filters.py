"""ROUGE-L dedup (same decisions as rouge_score), the instruction filters, stage-1 counts, and the
stage-2/4 answer rule on synthetic and on real SmolLM2-135M text."""
import json
import os
import random
import re

import pytest

from dromedary_jax.pipeline.data_files import load_seed_tasks
from dromedary_jax.pipeline.filters import (InstructionFilter, RougeLDeduper, rouge_l_f, rouge_l_keep,
                                            rouge_tokens)
from dromedary_jax.testing.scripted import ScriptedGenerator
from dromedary_jax.pipeline.stages.self_instruct import encode_vanilla_prompt, parse_vanilla

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def reference_keep(candidates, pool, threshold=0.7):
    """rouge_score-based filtering as the self-instruct / Alpaca scripts do it. Stopping at the
    first pool member over the threshold (newest first) gives the same decisions, faster."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    toks = [scorer._tokenizer.tokenize(p) for p in pool]
    out = []
    for c in candidates:
        ct = scorer._tokenizer.tokenize(c)
        keep = not any(rouge_scorer._score_lcs(ct, t).fmeasure > threshold for t in reversed(toks))
        out.append(keep)
        if keep:
            toks.append(ct)
    return out


def generated_instructions(n, seed=0):
    """Instructions parsed from scripted self-instruct generations (near-duplicates included)."""
    seeds = load_seed_tasks("data/seed_tasks/seed_tasks.jsonl")
    gen, rng, out, j = ScriptedGenerator(), random.Random(seed), [], 0
    while len(out) < n:
        prompt = encode_vanilla_prompt("Tasks:", rng.sample(seeds, 3))
        text = gen.generate([prompt], ids=[f"t{j}"], max_new_tokens=1024, seed=seed)[0]
        out += [c["instruction"] for c in parse_vanilla(text, 3)]
        j += 1
    return out[:n], [s["instruction"] for s in seeds]


def test_agrees_with_rouge_score_on_2000_generated_instructions():
    cands, pool = generated_instructions(2000)
    ours = rouge_l_keep(cands, pool, 0.7)
    ref = reference_keep(cands, pool, 0.7)
    assert ours == ref
    assert 50 < sum(ours) < 1950  # both decisions occur a lot


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 1.0])
def test_agrees_on_edge_cases(threshold):
    rng = random.Random(1)
    words = "a an the cat sat on mat dog ran to park Über naïve x_y 42 I'm co-op".split()
    cands = ["", "!!!", "...", "ÜBER über", "the cat", "The  CAT!", "cat the"]
    for _ in range(400):
        cands.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) + rng.choice(["", "?", "."]))
    pool = ["the cat sat on the mat", "", "a dog ran to the park"]
    assert rouge_l_keep(cands, pool, threshold) == reference_keep(cands, pool, threshold)


def test_exact_boundary_is_kept():
    # LCS 7 of 10 tokens each: F = 0.7 exactly -> not > 0.7 -> kept (as rouge_score decides)
    a = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
    b = "w0 w1 w2 w3 w4 w5 w6 x7 x8 x9"
    assert rouge_l_keep([b], [a], 0.7) == reference_keep([b], [a], 0.7) == [True]
    c = "w0 w1 w2 w3 w4 w5 w6 w7 x8 x9"  # F = 0.8
    assert rouge_l_keep([c], [a], 0.7) == [False]


def test_kept_candidates_join_the_pool():
    assert rouge_l_keep(["write a poem about cats", "write a poem about cats!"], []) == [True, False]
    d = RougeLDeduper(["explain gravity"], 0.7)
    assert d.keep(["explain gravity please now"]) == [True]   # F = 2*2/(2+4) = 0.67
    assert d.keep(["explain gravity please now!"]) == [False]  # duplicate of the kept one


def test_tokens_and_f_match_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("The quick brown fox.", "the fox is quick"), ("İstanbul ÀB x_y", "istanbul ab x y"),
             ("", "anything"), ("a b c d", "d c b a")]
    for t, p in pairs:
        assert rouge_tokens(t) == scorer._tokenizer.tokenize(t)
        assert rouge_l_f(rouge_tokens(t), rouge_tokens(p)) == scorer.score(t, p)["rougeL"].fmeasure


def test_instruction_filter_reasons():
    f = InstructionFilter(min_words=4, max_words=10)
    assert f.reason("Write a short poem about autumn.") is None
    assert f.reason("Do it now.") == "too_short"
    assert f.reason(" ".join(["word"] * 11)) == "too_long"
    assert f.reason("Draw a cat sitting on a chair.") == "blacklist"
    assert f.reason("Summarize the text below for me.", "see the attached file") == "blacklist"
    assert f.reason("Describe the drawing style of Monet.") is None  # whole words only
    assert f.reason("- List three facts about owls.") == "leading_punctuation"
    assert f.reason("¿Qué hora es en Madrid ahora?") == "non_ascii"


# ------------------------------------------------------------------ stage-1 counts

def test_parse_vanilla_skips_empty_pieces_between_separators():
    """A run of '###' lines (or a piece holding only headers) is no candidate, and the pieces after
    it still parse (they are numbered on from the last real one)."""
    gen = (" Name three rivers in Africa.\n3. Input:\n<noinput>\n###\n###\n\n###\n4. Instruction:\n4. Input:\n"
           "<noinput>\n###\n4. Instruction: Fix the grammar.\n4. Input:\nHe go home.\n###\n###\n5. Instruction: cut")
    out = parse_vanilla(gen, 2)
    assert [(c["instruction"], c["input"], c["malformed"]) for c in out] == [
        ("Name three rivers in Africa.", "", False), ("Fix the grammar.", "He go home.", False)]
    assert [c["k"] for c in out] == [0, 4]  # piece positions: candidate ids stay stable
    assert parse_vanilla("\n" + "###\n" * 60 + "4. Instruction: x", 3) == []
    # a real but malformed piece is still a candidate
    assert [c["malformed"] for c in parse_vanilla(" Sort these.\n###\n\n###\n5. Instruction: no input\n###\n", 3)] \
        == [True, True]


def _vanilla_only_config(num_instructions, batch_size=8):
    from dromedary_jax.pipeline.defaults import get_defaults

    c = get_defaults()
    c.model.kind = "scripted"
    c.stages = ("self_instruct",)
    si = c.self_instruct
    si.batch_size = batch_size
    si.topics.enabled = False
    si.questions.enabled = False
    v = si.vanilla
    v.num_instructions = num_instructions
    v.requests_per_round = 8
    v.max_rounds = 4
    v.prompt_seed_tasks = 3
    v.prompt_machine_tasks = 1
    return c


def test_vanilla_keeps_exactly_num_instructions(tmp_path):
    """One round of 8 scripted prompts yields ~25 good instructions; asking for 7 keeps exactly 7,
    the same 7 whatever the batch size, and every parsed candidate is accounted for."""
    import json

    from dromedary_jax.pipeline.stages.self_instruct import VANILLA_REASONS
    from dromedary_jax.run import run_stages

    kept = []
    for bs in (8, 3):
        wd = tmp_path / f"bs{bs}"
        counts = run_stages(_vanilla_only_config(7, bs), str(wd), report=False)["self_instruct"]
        assert counts["vanilla_kept"] == counts["prompts"] == 7
        prompts = [json.loads(x) for x in open(wd / "self_instruct" / "prompts.jsonl")]
        cands = [json.loads(x) for x in open(wd / "self_instruct" / "candidates.jsonl")]
        assert len(prompts) == 7 and counts["candidates"] == len(cands)
        assert {c["filter"] for c in cands} <= {None, *VANILLA_REASONS}
        assert counts["filtered"].get("target_reached", 0) > 0
        assert all(c["instruction"] for c in cands)  # no empty pieces counted
        funnel = open(wd / "self_instruct" / "funnel.md").read()
        assert f"| instructions parsed | {len(cands)} |" in funnel and "| - target_reached | 7 |" in funnel
        kept.append([p["id"] for p in prompts])
    assert kept[0] == kept[1]


# ------------------------------------------------------------------ stage-2/4 answer rule (shared)

NAMES = ("Watson", "Dromedary")


def test_cut_at_turn_cuts_further_turns_not_headings():
    from dromedary_jax.pipeline.answer_filters import cut_at_turn

    for tail in ("\n\nWatson: again", "\nUser: thanks", "\n\nDromedary (detailed): more", "\n  Watson (auto reply): ok",
                 "\n\n# Watson\n\nWatson is an AI", "\n###\n2. Instruction: x", "\n### Response: y", "\n\nUser:"):
        assert cut_at_turn("An answer.\n- item one." + tail, NAMES) == ("An answer.\n- item one.", True), tail
    for text in ("Soup:\n\n### Ingredients\n- 2 tomatoes\n\n### Steps\n1. Chop.", "Use it as follows: Watson said hi.",
                 "Customer: One latte, please.\nBarista: Coming right up."):
        assert cut_at_turn(text, NAMES) == (text, False)
    # a header at the very start stays (the filter reports it instead of an empty answer)
    assert cut_at_turn("Watson (internal thoughts): x.\n\nWatson: y", NAMES) == ("Watson (internal thoughts): x.", True)


def test_degenerate_reasons_and_good_answers():
    from dromedary_jax.pipeline.answer_filters import degenerate

    keys = ("helpful", "candor", "step-by-step")
    bad = {
        "I can't say. I should follow principles 2 (helpful), 7 (candor).": "thoughts_leak",
        "Here are my internal thoughts on the matter, which I share.": "thoughts_leak",
        "I have to follow 13 (step-by-step) here, so first add the numbers.": "thoughts_leak",
        "The user asks about the weather in a city that I know nothing about.": "thoughts_leak",
        "Sure. The capital is Canberra. Watson: The capital is Canberra, which I know.": "turn_marker",
        "Watson (auto reply): You're welcome, let me know if you need more.": "turn_marker",
        "Dromedary: Here is the answer you asked for, in detail.": "turn_marker",
        "Use a mix of " + "3D-printed, " * 30 + "parts.": "repetition",
        " ".join(f"Step {i}: I add the sugar to the pot and stir it well." for i in range(8)): "repetition",
    }
    for text, reason in bad.items():
        assert degenerate(text, NAMES, principle_keys=keys) == reason, text
    thoughts = ("The user wants a short summary of the causes of the French Revolution in plain words. "
                "I should follow principles 2 (informative).")
    restated = "The user wants a short summary of the causes of the French Revolution in plain words."
    assert degenerate("Sure! " + restated, NAMES, thoughts=(thoughts,)) == "thoughts_leak"
    good = [
        "Canberra is the capital of Australia. It was chosen as a compromise between Sydney and Melbourne.",
        "Soup:\n\n### Ingredients\n- 2 tomatoes\n- 1 onion\n\n### Steps\n1. Chop the onion.\n2. Simmer for 20 minutes.",
        "def f(x):\n    return x * x\n\nprint(f(1))\nprint(f(2))\nprint(f(3))\n\nThis prints 1, 4 and 9.",
        "2 x 1 = 2\n2 x 2 = 4\n2 x 3 = 6\n2 x 4 = 8\n2 x 5 = 10\n2 x 6 = 12\n2 x 7 = 14\n2 x 8 = 16\n2 x 9 = 18",
        "Customer: One latte, please.\nBarista: Sure, that will be four dollars.\nCustomer: Here you go.",
        "Mix 1 (one) cup of flour with the eggs, then bake it for 20 minutes at 180 C until golden.",
    ]
    for text in good:
        assert degenerate(text, NAMES, principle_keys=keys, thoughts=(thoughts,)) is None, text
    # what the question itself says does not count
    assert degenerate("Principle 1: keep it simple. Principle 2: test it.", NAMES,
                      question="Name two principles of good design.") is None
    assert degenerate("Dromedary: a camel with one hump, found in the Middle East.", NAMES,
                      question="What is a dromedary?") is None
    assert degenerate("The user asks for a refund, so the agent checks the receipt first.", NAMES,
                      question="Describe what happens when the user asks for a refund.") is None


# ------------------------------------------------------------------ real SmolLM2-135M outputs

REAL_OUTPUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "real_outputs", "smollm2_135m.jsonl")
_HEADER = re.compile(r"(?m)(?<!\w)(?:User|Watson|Dromedary)(?:[ \t]*\([^()\n]*\))?[ \t]*:|\(auto reply\)|"
                     r"^[ \t]*#[ \t]*(?:Watson|Dromedary)[ \t]*$")
_CITES = re.compile(r"internal thoughts|\bprinciples? \d|\d+ \((?:helpful|candor|step-by-step|clarification|"
                    r"creative|operational|informative|multi-aspect|reasoning|static|ethical)\)", re.IGNORECASE)


def _real(stage):
    with open(REAL_OUTPUTS, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


def _question(r):
    return r["question"] + (("\n\n" + r["input"]) if r["input"] else "")


def test_real_self_align_outputs_are_filtered_as_hand_labelled():
    """Stage 2 on real SmolLM2-135M continuations of the real principle prompt: every answer the
    hand labels drop is dropped with the labelled reason, every on-form one is kept, and no kept
    answer restates the thoughts template or carries a turn header."""
    from dromedary_jax.pipeline.stages import self_align as S2
    from dromedary_jax.pipeline.defaults import complete, get_defaults

    config = complete(get_defaults())
    rendered, assistant = S2.render_prompt(config)
    cleaner = S2.make_cleaner(config, rendered, assistant)
    recs = _real("self_align")
    assert len(recs) >= 60
    got, kept = {}, []
    for r in recs:
        out = cleaner.process(r["raw"], _question(r))
        got[r["id"]] = out["filter"]
        if out["filter"] is None:
            kept.append((r["id"], out["answer"]))
    wrong = {r["id"]: (r["expected"], got[r["id"]]) for r in recs
             if not r.get("known_miss") and got[r["id"]] != r["expected"]}
    assert not wrong, wrong  # id: (hand label, filter)
    assert {r["expected"] for r in recs} >= {None, "thoughts_leak", "repetition", "exemplar_leak", "no_answer"}
    for rid, answer in kept:
        assert not _HEADER.search(answer) and not _CITES.search(answer), (rid, answer)
        assert "The user asks" not in answer and "The user wants" not in answer, (rid, answer)
    # the failure of the run this fixture was made for: thoughts restated with a header inside
    restated = [r for r in recs if r["expected"] == "thoughts_leak"]
    assert len(restated) >= 30 and all(got[r["id"]] == "thoughts_leak" for r in restated)


def test_real_verbose_outputs_are_filtered_as_hand_labelled():
    from dromedary_jax.pipeline import data_files as D
    from dromedary_jax.pipeline.stages import verbose_clone as VC
    from dromedary_jax.pipeline.defaults import complete, get_defaults

    config = complete(get_defaults())
    assistant = D.load_assistant(config.data)
    recs = _real("verbose_clone")
    for r in recs:
        assert VC.question_of(r["prompt"], assistant) == _question(r)
    stored = [{"id": r["id"], "prompt": r["prompt"], "raw": r["raw"]} for r in recs]  # as responses-*.jsonl
    out = {r["id"]: r for r in VC.filter_records(stored, assistant, config.verbose_clone)}
    wrong = {r["id"]: (r["expected"], out[r["id"]]["filter"]) for r in recs if out[r["id"]]["filter"] != r["expected"]}
    assert not wrong, wrong
    assert {r["expected"] for r in recs} >= {None, "too_short", "turn_marker", "persona_leak"}
    for r in out.values():
        if r["filter"] is None:
            assert not _HEADER.search(r["answer"]) and not _CITES.search(r["answer"]), r


def test_stages_2_and_4_cut_and_filter_by_one_rule():
    """The same continuation after the answer header gets the same cleaned answer and the same
    shared reason in stage 2 (before the rename) and stage 4."""
    from dromedary_jax.pipeline.stages import verbose_clone as VC
    from dromedary_jax.pipeline.answer_filters import REASONS
    from dromedary_jax.pipeline.defaults import complete, get_defaults
    from dromedary_jax.pipeline.stages import self_align as S2

    config = complete(get_defaults())
    rendered, assistant = S2.render_prompt(config)
    cleaner = S2.make_cleaner(config, rendered, assistant)
    cleaner.rename = False
    texts = [
        "Canberra is the capital of Australia, not Sydney.\n\nDromedary: Anything else you would like to know?",
        "Canberra is the capital of Australia, not Sydney.\n\nWatson: Anything else you would like to know?",
        "Canberra is the capital of Australia, not Sydney.\nDromedary (detailed): more",
        "Canberra is the capital of Australia, not Sydney.\n\n# Watson\n\nWatson is an AI assistant.",
        "Canberra is the capital of Australia. I should follow principles 2 (informative), 3 (helpful).",
        "Watson (internal thoughts): The user asks about Australia, so I answer with its capital city.",
        "It is Canberra. Dromedary: Sydney is bigger, but Canberra is the capital of Australia.",
        "Watson (auto reply): Canberra is the capital of Australia, not Sydney.",
        "It is Canberra, as I said. " + "Canberra, " * 40 + "the capital.",
        "Soup:\n\n### Ingredients\n- 2 tomatoes and 1 onion\n\n### Steps\n1. Chop and simmer for 20 minutes.",
    ]
    reasons = set()
    for t in texts:
        s2 = cleaner.process(" The user asks about Australia. I should follow principles 3 (helpful).\n\nWatson: " + t,
                             "What is the capital of Australia?")
        s4 = VC.clean_answer(t, assistant, (), 20, "What is the capital of Australia?")
        assert (s2["answer"], s2["filter"]) == s4, t
        reasons.add(s4[1])
    assert reasons == {None, *REASONS}


def test_parse_topics_blank_lines_are_no_topics():
    """Blank lines between topics neither count as lines nor use up the per-call budget."""
    from dromedary_jax.pipeline.stages.self_instruct import parse_questions, parse_topics

    acc, rej = parse_topics("6. Solar Energy\n\n7. Tax Law\n\n\n8. Rural Schools\n\n9. Extra Topic", max_topics=3)
    assert acc == ["Solar Energy", "Tax Law", "Rural Schools"] and rej == []
    acc, rej = parse_topics("\n\n6. Solar Energy\n7.\n  \n8. bad one", max_topics=10)
    assert acc == ["Solar Energy"] and [r[1] for r in rej] == ["empty", "not_capitalized"]
    expected = [["6. type: Law, topic: Art", "Law", "Art"]]
    qs, rej = parse_questions("\n\n6. type: Law, topic: Art, instruction: Can I sue a painter?\n\n\n", expected)
    assert len(qs) == 1 and rej == []
