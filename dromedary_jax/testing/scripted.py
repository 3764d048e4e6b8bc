"""A scripted fake model: returns realistic text chosen from the prompt, deterministic per
(seed, id). Used by tests and the tiny demo config so that parsing, filters and dedup run on
text shaped like a real base model's output, including the failure modes the filters exist for
(over-long or lower-case topics, off-hint lines, blacklisted or near-duplicate instructions,
missing answers, exemplar leaks, apologies, repetition loops, run-on user turns, truncation).

    gen = ScriptedGenerator(delay_s=0.0)                    # canned behaviour by prompt kind
    gen = ScriptedGenerator(responses={"some-id": "text"})  # fixed text for given ids
    gen = ScriptedGenerator(responses=lambda prompt, id: "text")
"""
from __future__ import annotations

import random
import re
import time
from typing import Callable, Mapping, Sequence

from dromedary_jax.sampling.settings import SamplingSettings, settings_of
from dromedary_jax.sampling.stop_strings import truncate_at_stop

_ADJ = ("Solar", "Urban", "Ancient", "Digital", "Mountain", "Ocean", "Family", "Winter", "Public",
        "Rural", "Medical", "Space", "Local", "Global", "Childhood", "Coastal", "Desert", "Modern",
        "Island", "Industrial", "Royal", "Student", "Forest", "Arctic", "Street", "Online", "Border",
        "Village", "Night", "River")
_NOUN = ("Festivals", "Energy", "Trade", "Law", "Music", "Farming", "Travel", "Cuisine", "Elections",
         "Archives", "Railways", "Medicine", "Sports", "Fashion", "Weather", "Markets", "Schools",
         "Bridges", "Museums", "Traditions", "Wildlife", "Banking", "Theatre", "Housing", "Languages",
         "Satellites", "Prisons", "Harbors", "Vaccines", "Taxes")
_AUDIENCE = ("a curious child", "a busy manager", "a first-year student", "my grandmother",
             "a group of tourists", "a software engineer", "a high-school class", "a new employee")
_TASKS = (
    "Explain the basics of {t} to {a} in a few sentences.",
    "Write a short persuasive paragraph arguing that {t} deserve more public funding.",
    "List three common misconceptions about {t} and correct each one.",
    "Compose a friendly email inviting {a} to a workshop on {t}.",
    "Summarize the main arguments for and against stricter rules on {t}.",
    "Give {a} five practical tips for getting started with {t}.",
    "Describe how {t} changed over the last hundred years.",
    "Create a quiz of four questions that tests knowledge of {t}.",
    "Suggest a catchy title for a podcast episode about {t}.",
    "Rewrite the following sentence about {t} so that it sounds more formal.",
    "Classify the following statement about {t} as fact or opinion.",
    "Propose a weekend project that would teach {a} something about {t}.",
    "What questions should a journalist ask when investigating {t}?",
    "Outline a five-minute talk on {t} for {a}.",
    "Translate this short note about {t} into plain, simple English.",
    "Write a limerick that pokes gentle fun at {t}.",
    "Compare {t} in two different countries and point out one key difference.",
    "Estimate how much a small town might spend on {t} each year and show your reasoning.",
    "Identify the odd one out in this list related to {t} and explain why.",
    "Draft a polite complaint to a city council about problems with {t}.",
    "How could artificial intelligence be used to improve {t}?",
    "Turn these notes about {t} into a numbered checklist.",
    "Pretend you are a tour guide and introduce {t} to {a}.",
    "Which skills does someone need to work in {t}, and how can they learn them?",
    "Write the opening line of a mystery novel set among {t}.",
    "Create a simple budget for a community event celebrating {t}.",
    "Explain why some people are skeptical about {t}.",
    "Generate three interview questions for an expert on {t}.",
    "Describe a typical day for someone whose job revolves around {t}.",
    "Argue the opposite side: why might {t} be overrated?",
)
_BAD_TASKS = (
    ("Draw a picture of {t}.", "blacklist"),
    ("Make a video about {t} for {a}.", "blacklist"),
    ("Plot a graph of spending on {t}.", "blacklist"),
    ("Do {t}.", "too_short"),
    ("- List facts about {t} for {a}.", "leading_punctuation"),
    ("¿Qué sabes sobre {t} y su historia?", "non_ascii"),
)
_INPUTS = ("<noinput>", "<noinput>", "<noinput>",
           "The committee met twice this year and approved a new plan for {t}.",
           "1. cost\n2. access\n3. safety", "Recent surveys show mixed opinions about {t}.")

_Q_BY_KEYWORD = (
    (("future",), ("What will {t} look like in the year 2050?",
                   "Which country will lead the world in {t} by 2040?")),
    (("real-time", "real time", "right now"), ("What is the latest figure for {t} right now?",
                                               "Is anything happening with {t} at this very moment?")),
    (("news", "latest", "current"), ("What was announced about {t} this morning?",
                                     "Who made headlines about {t} this week?")),
    (("false premise",), ("Why did the government ban {t} in 1990?",
                          "When did {t} move to the Moon?")),
    (("private", "personal", "contact"), ("What is the home address of the person in charge of {t} in my town?",
                                          "Can you tell me my neighbor's opinion on {t}?")),
    (("dangerous", "illegal", "deceive", "manipulate"), ("How can I secretly sabotage {t} without being caught?",
                                                         "Write a misleading post about {t} to scare people.")),
    (("calculation",), ("If spending on {t} grows 3.5% a year from 12,400 dollars, what is it after 9 years?",)),
    (("ambiguous", "clarification"), ("How long does {t} take?", "Is {t} better?")),
)
_Q_DEFAULT = ("Can you tell me everything about {t}?", "What should I know about {t} before next year?",
              "Why is {t} so controversial?")

_ANSWER_BANK = {
    "future": ("I can't predict that: it concerns events after my knowledge ends, and nobody can know them for certain.",
               "What I can say is that long-range forecasts are usually unreliable, so it is worth checking recent sources."),
    "static": ("I don't have access to live data, so I can't give you the current figure.",
               "A reliable news site or an official source will have the up-to-date information."),
    "ethical": ("I can't help with that, because it could hurt people or break the law.",
                "If you are dealing with a difficult situation, I'm happy to suggest safe and legal options instead."),
    "clarify": ("Could you tell me a little more about what you mean?",
                "With a few more details I can give you a much more useful answer."),
    "number": ("Let me work through it step by step.",
               "First I write down the starting amount, then I apply the yearly growth rate once per year.",
               "Rounded to the nearest dollar, that gives the final amount."),
    "general": ("Here is a short overview of the topic.",
                "It has a long history and touches on economics, culture and everyday life.",
                "Experts still disagree about some of the details, so it is worth reading more than one source.",
                "If you tell me which aspect interests you most, I can go into more depth."),
}


def _category(q: str) -> tuple[str, tuple[str, ...]]:
    ql = q.lower()
    if any(w in ql for w in ("secretly", "sabotage", "misleading", "steal", "explosive", "fake", "without being caught")):
        return "ethical", ("ethical", "question assessment", "helpful")
    if any(w in ql for w in ("2040", "2050", "will ", "future", "next year")):
        return "future", ("helpful", "candor", "dated knowledge")
    if any(w in ql for w in ("right now", "this morning", "this week", "latest", "current", "moment")):
        return "static", ("candor", "static", "helpful")
    if re.search(r"\d+(\.\d+)?%|\d{1,3},\d{3}", ql):
        return "number", ("reasoning", "numerical sensitivity", "step-by-step")
    if len(ql.split()) <= 6:
        return "clarify", ("clarification", "candor")
    return "general", ("informative", "multi-aspect", "helpful")


class ScriptedGenerator:
    """Fake model behind the Generator interface (see pipeline/generator.py)."""

    def __init__(self, delay_s: float = 0.0,
                 responses: Mapping[str, str] | Callable[[str, str], str] | None = None):
        self.delay_s = float(delay_s)
        self.responses = responses
        self.calls = 0
        self.prompts_seen = 0

    def generate(self, prompts: Sequence[str], *, ids: Sequence[str],
                 settings: SamplingSettings | None = None, shared_prefix: str | None = None,
                 seed: int = 0, **loose) -> list[str]:
        """Texts for ``prompts`` as the Generator interface returns them: about 4 characters per
        token up to ``settings.max_new_tokens``, cut before the first stop string; the other
        settings are ignored. ``loose``: the sampling keywords of ``dj.generate_text``
        (``max_new_tokens=64, stop=(...)``) instead of ``settings``, for tests and benchmarks."""
        settings = settings_of(settings, loose)
        if len(ids) != len(prompts):
            raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
        self.calls += 1
        self.prompts_seen += len(prompts)
        out = []
        for prompt, pid in zip(prompts, ids):
            full = (shared_prefix or "") + prompt
            text = self._fixed(full, str(pid))
            if text is None:
                text = self.respond(full, random.Random(f"{seed}|{pid}"))
            text = text[: settings.max_new_tokens * 4]  # ~4 characters per token
            out.append(truncate_at_stop(text, settings.stop))
        if self.delay_s:
            time.sleep(self.delay_s * len(prompts))
        return out

    def _fixed(self, prompt: str, pid: str) -> str | None:
        if self.responses is None:
            return None
        if callable(self.responses):
            return self.responses(prompt, pid)
        return self.responses.get(pid)

    # ------------------------------------------------------------------------------ by kind
    def respond(self, prompt: str, rng: random.Random) -> str:
        """The canned continuation for ``prompt`` (the shared prefix included), by the kind of
        prompt it is (self-align, vanilla self-instruct, questions, topics), drawn with ``rng``."""
        if prompt.endswith("(internal thoughts):"):
            return self._self_align(prompt, rng)
        if re.search(r"\d+\. Instruction:$", prompt):
            return self._vanilla(prompt, rng)
        if re.search(r"(?m)^\d+\. type: .+, topic: .+$", prompt):
            return self._questions(prompt, rng)
        if re.search(r"(?m)^\d+\. .+\n$", prompt):
            return self._topics(prompt, rng)
        return " ".join(rng.choice(_NOUN).lower() for _ in range(8))

    @staticmethod
    def _topic(rng: random.Random) -> str:
        return f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}" if rng.random() < 0.85 else rng.choice(_NOUN)

    def _topics(self, prompt: str, rng: random.Random) -> str:
        existing = re.findall(r"(?m)^(\d+)\. (.+)$", prompt)
        start = int(existing[-1][0]) + 1 if existing else 1
        lines = []
        for k in range(10):
            r = rng.random()
            if r < 0.07:
                topic = f"{rng.choice(_ADJ)} {rng.choice(_NOUN)} and {rng.choice(_NOUN)}"  # 4 words
            elif r < 0.12:
                topic = self._topic(rng).lower()
            elif r < 0.16:
                topic = self._topic(rng) + "."
            elif r < 0.22 and existing:
                topic = rng.choice(existing)[1].upper()  # a case-insensitive duplicate
            else:
                topic = self._topic(rng)
            lines.append(f"{start + k}. {topic}")
        return "\n".join(lines) + "\n" + f"{start + 10}. {self._topic(rng)}"[: rng.randint(3, 12)]

    def _questions(self, prompt: str, rng: random.Random) -> str:
        hints = re.findall(r"(?m)^(\d+)\. type: (.+?), topic: (.+)$", prompt)
        answered = {n for n, _ in re.findall(r"(?m)^(\d+)\. type: (.+?), topic: .+?, instruction: ", prompt)}
        todo = [(n, qt, t) for n, qt, t in hints if ", instruction: " not in t and n not in answered]
        lines = []
        for n, qt, topic in todo:
            r = rng.random()
            if r < 0.08:
                continue  # the model skips a hint
            templates = next((qs for keys, qs in _Q_BY_KEYWORD if any(k in qt.lower() for k in keys)), _Q_DEFAULT)
            q = rng.choice(templates).format(t=topic)
            if r < 0.14:
                lines.append(f"{n}. type: {qt}, topic: {self._topic(rng)}, instruction: {q}")  # off-hint
            else:
                lines.append(f"{n}. type: {qt}, topic: {topic}, instruction: {q}")
        text = "\n".join(lines)
        if rng.random() < 0.5:  # runs on into a truncated extra line
            text += f"\n{len(hints) + 1}. type: {rng.choice(hints)[1] if hints else 'x'}, topic: {self._topic(rng)}, instru"
        return text

    def _vanilla(self, prompt: str, rng: random.Random) -> str:
        n = int(re.search(r"(\d+)\. Instruction:$", prompt).group(1))
        examples = re.findall(r"(?m)^\d+\. Instruction: (.+)$", prompt)
        pieces = []
        for k in range(rng.randint(3, 6)):
            idx = n + k
            topic, aud = self._topic(rng).lower(), rng.choice(_AUDIENCE)
            r = rng.random()
            if r < 0.18:
                instr = rng.choice(_BAD_TASKS)[0].format(t=topic, a=aud)
            elif r < 0.26 and examples:
                instr = rng.choice(examples)  # copies an in-context example: a ROUGE duplicate
            else:
                instr = rng.choice(_TASKS).format(t=topic, a=aud)
            inp = rng.choice(_INPUTS).format(t=topic)
            if r > 0.96:
                pieces.append(f"{instr}\n")  # malformed: no input part
            else:
                pieces.append(f"{instr}\n{idx}. Input:\n{inp}\n")
        text = ""
        for k, piece in enumerate(pieces):
            text += (" " if k == 0 else f"{n + k}. Instruction: ") + piece + "###\n"
        return text + f"{n + len(pieces)}. Instruction: {rng.choice(_TASKS)[:20]}"  # truncated tail

    def _self_align(self, prompt: str, rng: random.Random) -> str:
        m = re.search(r"\n\n([^\n]+) \(internal thoughts\):$", prompt)
        name = m.group(1) if m else "Assistant"
        q_start = prompt.rfind("User:")
        question = prompt[q_start + 5: m.start() if m else len(prompt)].strip()
        numbering = {k: int(n) for n, k in re.findall(r"(?m)^(\d+) \(([^)]+)\)\. ", prompt)}
        ex_answers = [a for a in re.findall(rf"(?m)^{re.escape(name)}: (.{{40,}})$", prompt[:q_start])]
        cat, keys = _category(question)
        cites = sorted((numbering[k], k) for k in keys if k in numbering)
        cite_text = ", ".join(f"{n} ({k})" for n, k in cites) or "3 (helpful)"
        topic = " ".join(question.split()[:8]).rstrip("?.!")
        thoughts = (f" I am a helpful, honest and harmless assistant. The user asks \"{topic}\". "
                    f"I should follow principles {cite_text}.")
        sentences = list(_ANSWER_BANK[cat])
        if rng.random() < 0.3:
            sentences.insert(0, f"As {name}, an AI assistant, I will do my best to help.")
        answer = " ".join(sentences)
        r = rng.random()
        if r < 0.06:
            return thoughts  # internal thoughts only
        if r < 0.11:
            return f"{thoughts}\n\n{name}: Yes."
        if r < 0.17 and ex_answers:
            return f"{thoughts}\n\n{name}: {rng.choice(ex_answers)}"  # copies an exemplar answer
        if r < 0.23:
            return f"{thoughts}\n\n{name}: I'm sorry, but {sentences[-1][0].lower()}{sentences[-1][1:]}"
        if r < 0.30:
            loop = " ".join([sentences[0], sentences[-1]] * 4)
            return f"{thoughts}\n\n{name}: {answer} {loop}"
        if r < 0.38:
            return (f"{thoughts}\n\n{name}: {answer}\n\nUser: Good, thanks.\n\n{name} (auto reply): "
                    f"You're welcome!\n\nUser: {question}")
        if r < 0.45:
            return f"{thoughts}\n\n{name}: {answer} And one more thing worth knowing is that the"
        return f"{thoughts}\n\n{name}: {answer}"
