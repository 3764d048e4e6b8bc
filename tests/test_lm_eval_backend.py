"""lm-evaluation-harness backend (``--model dromedary_jax``) against the harness's own ``--model hf``
on the same tiny random LLaMA folders (saved with save_pretrained), through
``lm_eval.simple_evaluate`` on local tasks (JSONL data, task YAMLs given with include_path):
multiple choice (loglikelihood), perplexity (loglikelihood_rolling, several windows each) and
greedy generation (generate_until). Two tokenizers: a LLaMA-style SentencePiece model (BOS added,
the lone "▁" seam) and a byte-level BPE tokenizer.json that adds no BOS (as SmolLM2).
Also: our TruthfulQA MC scorer equals the harness's truthfulqa_mc1 / mc2 tasks (their own YAMLs,
local data) run through the backend; ``python -m dromedary_jax.lm_eval`` runs and reports bad
model arguments in one line; sampled texts do not depend on the batch size; and (slow) the
command on 2 processes x 4 CPU devices gives the one-process results. Nothing downloads
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; datasets' cache in the test's temporary folder).
"""
from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from helpers import tiny_corpus, tiny_hf_model  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "eval")
MAX_LENGTH = 32  # context length given to both backends: several rolling windows per document
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]

MC_DOCS = [
    {"question": "Q: Why is the sky blue?\nA:", "choices": ["air scatters light", "the sea"],
     "label": 0},
    {"question": "The quick brown fox jumps over the ", "choices": ["lazy dog", "moon", "fence"],
     "label": 1},  # trailing space: moves to the continuation
    {"question": " ".join(["explain why the assistant answers questions about science"] * 4),
     "choices": ["because it helps", "no"], "label": 0},  # longer than MAX_LENGTH: cut left
    {"question": "(internal thoughts): ok\n###", "choices": [" User: hi", "Assistant"],
     "label": 0},
]
# An empty context: the continuation (" " + choice) is encoded alone. transformers 5 converts a
# tokenizer.model into a Metaspace tokenizer that encodes a text starting with a space without
# SentencePiece's lone "▁" piece (sentencepiece itself, and so our tokenizer, keeps it), so with
# the SentencePiece folder hf and we score different ids here: checked on the BPE folder only.
EMPTY_DOCS = [{"question": "", "choices": ["hello world", "the answer"], "label": 0}]
PPL_DOCS = [{"text": line} for line in (
    " ".join(tiny_corpus(6, seed=1)),
    "Hello world. " * 12,
    "short one",
)]
GEN_DOCS = [{"question": q, "answer": a} for q, a in (
    ("Q: What is the first step?\nA:", "answer"),
    ("The assistant says", "hello"),
    ("0123456789 ABCDEF", "G"),
)]


def _yaml(path, **cfg):
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)  # JSON is YAML


def _jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


def _local(path, cache):
    return dict(dataset_path="json", dataset_name=None, validation_split="validation",
                dataset_kwargs={"data_files": {"validation": path}, "cache_dir": cache})


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    cache = str(d / "hf_datasets_cache")
    for name, docs in (("mc", MC_DOCS), ("empty", EMPTY_DOCS), ("ppl", PPL_DOCS),
                       ("gen", GEN_DOCS)):
        _jsonl(str(d / f"{name}.jsonl"), docs)
    for task, data in (("tiny_mc", "mc"), ("tiny_mc_empty", "empty")):
        _yaml(d / f"{task}.yaml", task=task, output_type="multiple_choice",
              **_local(str(d / f"{data}.jsonl"), cache), doc_to_text="{{question}}",
              doc_to_choice="{{choices}}", doc_to_target="label",
              metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    _yaml(d / "tiny_ppl.yaml", task="tiny_ppl", output_type="loglikelihood_rolling",
          **_local(str(d / "ppl.jsonl"), cache), doc_to_text="", doc_to_target="{{text}}",
          metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                "bits_per_byte")])
    _yaml(d / "tiny_gen.yaml", task="tiny_gen", output_type="generate_until",
          **_local(str(d / "gen.jsonl"), cache), doc_to_text="{{question}}",
          doc_to_target="{{answer}}",
          generation_kwargs={"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
          metric_list=[{"metric": "exact_match"}])
    _yaml(d / "tiny_sample.yaml", task="tiny_sample", output_type="generate_until",
          **_local(str(d / "gen.jsonl"), cache), doc_to_text="{{question}}",
          doc_to_target="{{answer}}", repeats=2,
          generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": True,
                             "temperature": 1.0, "top_p": 0.9},
          metric_list=[{"metric": "exact_match"}])
    return str(d)


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory, llama_sp_tokenizer):
    """Tiny random HF LLaMA + LLaMA-style SentencePiece tokenizer (adds BOS)."""
    from dromedary_jax.tokenizer import save_tokenizer

    d = str(tmp_path_factory.mktemp("lm_eval_sp") / "model")
    tiny_hf_model(0, vocab_size=400, max_position_embeddings=1024).save_pretrained(d)
    save_tokenizer(llama_sp_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """Tiny random HF LLaMA + byte-level BPE tokenizer.json that adds no BOS (as SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = str(tmp_path_factory.mktemp("lm_eval_bpe") / "model")
    tiny_hf_model(1, vocab_size=320, max_position_embeddings=1024).save_pretrained(d)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return d


def _evaluate(model, folder, tasks, task_dir, batch_size=1, **model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import dromedary_jax.eval.lm_eval_backend  # noqa: F401  (registers "dromedary_jax")

    args = {"pretrained": folder, "max_length": MAX_LENGTH, **model_args}
    if model == "hf":
        args["dtype"] = "float32"
    return simple_evaluate(model=model, model_args=args, tasks=tasks, batch_size=batch_size,
                           device="cpu", log_samples=True, random_seed=0,
                           task_manager=TaskManager(include_path=task_dir,
                                                    include_defaults=False))


def _samples(out, task):
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _check_metrics(ours, ref, task):
    got, want = ours["results"][task], ref["results"][task]
    keys = [k for k, v in want.items() if isinstance(v, float) and k != "alias"]
    assert keys, want
    for k in keys:
        assert isinstance(got[k], float), (task, k, got[k])
        assert math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=1e-4), (task, k, got[k],
                                                                           want[k])


def _lls(sample):
    """[(log-likelihood, is greedy) or log-likelihood per request] of one logged sample."""
    return [r[0] for r in sample["resps"]]


@pytest.mark.parametrize("kind", ["sentencepiece_bos", "bpe_no_bos"])
def test_backend_matches_hf(kind, sp_folder, bpe_folder, task_dir):
    """The same metrics and per-request log-likelihoods (1e-4), and the same greedy texts."""
    folder = sp_folder if kind == "sentencepiece_bos" else bpe_folder
    tasks = TASKS if kind == "sentencepiece_bos" else TASKS + ["tiny_mc_empty"]
    ref = _evaluate("hf", folder, tasks, task_dir)
    ours = _evaluate("dromedary_jax", folder, tasks, task_dir)
    for task in tasks:
        _check_metrics(ours, ref, task)
        a, b = _samples(ours, task), _samples(ref, task)
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]
            ga, gb = _lls(sa), _lls(sb)
            if task == "tiny_gen" and kind == "bpe_no_bos":
                assert ga == gb  # byte-level BPE: the same text
            elif task == "tiny_gen":
                _check_sp_generation(folder, sa, sb)
            elif task == "tiny_ppl":
                assert all(math.isclose(x, y, rel_tol=0, abs_tol=1e-4) for x, y in zip(ga, gb)
                           ), (ga, gb)
            else:
                assert [g for _, g in ga] == [g for _, g in gb]
                assert all(math.isclose(x[0], y[0], rel_tol=0, abs_tol=1e-4)
                           for x, y in zip(ga, gb)), (ga, gb)
    # the requests really took the paths they are meant to cover
    ppl = _samples(ours, "tiny_ppl")
    assert len(ppl) == len(PPL_DOCS)
    from dromedary_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    assert tok.add_bos is (kind == "sentencepiece_bos")
    assert len(tok.encode(PPL_DOCS[0]["text"])) > 2 * MAX_LENGTH  # >= 3 rolling windows
    assert len(tok.encode(MC_DOCS[2]["question"])) > MAX_LENGTH  # a truncated context
    texts = [t for s in _samples(ours, "tiny_gen") for t in _lls(s)]
    assert any(texts), texts  # something was generated


def _check_sp_generation(folder, ours, hf):
    """SentencePiece: the texts may differ in decoding only (hf decodes the new tokens alone,
    dropping a leading space, and turns a run of byte tokens that is not valid UTF-8 into one
    U+FFFD per byte; we read the new tokens as the prompt's continuation, as sentencepiece
    decodes them). So: transformers' own greedy ids for the same prompt, read our way, are our
    text, and read hf's way are the hf backend's text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dromedary_jax.sampling.stop_strings import truncate_at_stop
    from dromedary_jax.sampling.text import continuation_text
    from dromedary_jax.tokenizer import load_tokenizer

    tok, hf_tok = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    context, gen_kwargs = ours["arguments"][0]
    stops, n = gen_kwargs["until"], gen_kwargs["max_gen_toks"]
    ids = tok.encode(context)
    assert ids == hf_tok(context)["input_ids"]
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_id)[0, len(ids):].tolist()
    assert new and len(new) <= n
    assert ours["resps"][0][0] == truncate_at_stop(continuation_text(tok, ids, new), stops)
    theirs = truncate_at_stop(hf_tok.decode(new, skip_special_tokens=True), stops)
    assert hf["resps"][0][0] == theirs


def test_sampling_does_not_depend_on_batch_size(bpe_folder, task_dir):
    """do_sample tasks: each request is seeded by (task, doc, index, repeat), so the texts do not
    change with the batch size; the two repeats of a document differ."""
    one = _evaluate("dromedary_jax", bpe_folder, ["tiny_sample"], task_dir, batch_size=1)
    many = _evaluate("dromedary_jax", bpe_folder, ["tiny_sample"], task_dir, batch_size=8)
    a = [s["resps"][0] for s in _samples(one, "tiny_sample")]  # [repeat 1 text, repeat 2 text]
    b = [s["resps"][0] for s in _samples(many, "tiny_sample")]
    assert a == b
    assert all(len(r) == 2 for r in a)
    assert any(r[0] != r[1] for r in a)


def _tqa_yaml(path, task, harness_yaml, data, cache):
    _yaml(path, include=harness_yaml, task=task, tag=[], **_local(data, cache))


def test_truthfulqa_scorer_equals_harness(sp_folder, tmp_path):
    """dj.eval's TruthfulQA MC1/MC2 (scorer + metrics) == the harness's own truthfulqa_mc1 /
    truthfulqa_mc2 task YAMLs on the same records, run through --model dromedary_jax."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import dromedary_jax as dj
    import dromedary_jax.eval.lm_eval_backend  # noqa: F401
    from dromedary_jax.eval.truthfulqa import QA_PREAMBLE, load_truthfulqa, score_truthfulqa

    records = (load_truthfulqa(os.path.join(DATA, "truthfulqa_tiny.json"))
               + load_truthfulqa(os.path.join(DATA, "truthfulqa_tiny.jsonl"))
               + load_truthfulqa(os.path.join(DATA, "bigbench_truthful_qa", "questions.json")))
    data = str(tmp_path / "tqa.jsonl")
    _jsonl(data, [{k: r[k] for k in ("question", "mc1_targets", "mc2_targets")}
                  for r in records])
    harness = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "truthfulqa")
    tasks = str(tmp_path / "tasks")
    os.makedirs(tasks)
    cache = str(tmp_path / "cache")
    for n in (1, 2):
        _tqa_yaml(os.path.join(tasks, f"tqa_mc{n}.yaml"), f"tqa_mc{n}_local",
                  os.path.join(harness, f"truthfulqa_mc{n}.yaml"), data, cache)
    out = simple_evaluate(model="dromedary_jax", model_args={"pretrained": sp_folder},
                          tasks=["tqa_mc1_local", "tqa_mc2_local"], log_samples=True,
                          task_manager=TaskManager(include_path=tasks, include_defaults=False))

    model, tok = dj.load_model(sp_folder), dj.load_tokenizer(sp_folder)
    per = score_truthfulqa(model, tok, records, preamble=QA_PREAMBLE)
    for n in (1, 2):
        samples = _samples(out, f"tqa_mc{n}_local")
        assert len(samples) == len(records) == len(per)
        for s, p in zip(samples, per):
            assert s["doc"]["question"] == p["question"]
            assert s["arguments"][0][0].startswith(QA_PREAMBLE + "\n\nQ: ")
            got = [ll for ll, _ in _lls(s)]
            assert all(math.isclose(x, y, rel_tol=0, abs_tol=1e-5)
                       for x, y in zip(got, p[f"mc{n}_lls"])), (got, p[f"mc{n}_lls"])
            assert math.isclose(s["acc"], p[f"mc{n}"], rel_tol=0, abs_tol=1e-6)
        mean = sum(p[f"mc{n}"] for p in per) / len(per)
        assert math.isclose(out["results"][f"tqa_mc{n}_local"]["acc,none"], mean,
                            rel_tol=0, abs_tol=1e-6)
    assert 0 < out["results"]["tqa_mc2_local"]["acc,none"] < 1


def test_cli(sp_folder, task_dir, tmp_path, capsys):
    """python -m dromedary_jax.lm_eval: the harness's command line with the backend registered;
    a bad model argument is one error line, exit status 2."""
    from dromedary_jax.lm_eval import main

    out = tmp_path / "out"
    main(["--model", "dromedary_jax", "--model_args",
          f"pretrained={sp_folder},max_length={MAX_LENGTH},batch_tokens=512",
          "--tasks", "tiny_mc", "--include_path", task_dir, "--output_path", str(out)])
    printed = capsys.readouterr().out
    assert "dromedary_jax" in printed and "tiny_mc" in printed and "acc" in printed
    results = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs
               if f.startswith("results")]
    assert len(results) == 1
    with open(results[0]) as f:
        assert 0 <= json.load(f)["results"]["tiny_mc"]["acc,none"] <= 1

    with pytest.raises(SystemExit) as e:
        main(["--model", "dromedary_jax", "--model_args", f"pretrained={sp_folder},temperature=1",
              "--tasks", "tiny_mc", "--include_path", task_dir])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: model_args: unknown argument(s) temperature"), err


@pytest.mark.parametrize("args,msg", [
    ({"mesh": "2x2"}, "mesh='2x2'"),
    ({"dtype": "float16"}, "dtype='float16'"),
    ({"max_length": 0}, "max_length=0"),
    ({"add_bos_token": "maybe"}, "add_bos_token='maybe'"),
    ({"prefix_token_id": -1}, "prefix_token_id=-1"),
    ({"pretrained": "/nonexistent/model"}, "no such file or folder"),
    ({"pretrained": None}, "needs model_args pretrained=PATH"),
])
def test_bad_model_args(args, msg, sp_folder):
    """Checked before anything is loaded: one UserError line each."""
    from dromedary_jax.errors import UserError
    from dromedary_jax.eval.lm_eval_backend import DromedaryJaxLM

    with pytest.raises(UserError) as e:
        DromedaryJaxLM(**{"pretrained": sp_folder, **args})
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_model_folder_without_tokenizer(tmp_path):
    from dromedary_jax.errors import UserError
    from dromedary_jax.eval.lm_eval_backend import DromedaryJaxLM

    tiny_hf_model(0).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json in the folder; "
                                        "pass tokenizer=PATH"):
        DromedaryJaxLM(pretrained=str(tmp_path / "m"))


def test_parse_mesh():
    from dromedary_jax.errors import UserError
    from dromedary_jax.eval.lm_eval_backend import parse_mesh

    assert parse_mesh(None) is None and parse_mesh("") is None
    assert parse_mesh("1x-1x1") == (1, -1, 1) and parse_mesh("2:2:2") == (2, 2, 2)
    assert parse_mesh({"fsdp": -1}) == {"fsdp": -1}
    for bad in ("1,-1,1", "2x2", "axbxc"):
        with pytest.raises(UserError, match="mesh="):
            parse_mesh(bad)


def _result_files(folder):
    """(results dict, {task: {doc_id: sample}}) of a harness --output_path folder."""
    found = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    res = [p for p in found if os.path.basename(p).startswith("results")]
    assert len(res) == 1, found
    with open(res[0]) as f:
        results = json.load(f)["results"]
    samples = {}
    for p in found:
        name = os.path.basename(p)
        if name.startswith("samples_"):
            task = name[len("samples_"):].rsplit("_", 1)[0]
            with open(p) as f:
                samples[task] = {s["doc_id"]: s for s in map(json.loads, f)}
    return results, samples


@pytest.mark.slow
def test_two_processes_match_one(bpe_folder, task_dir, tmp_path):
    """python -m dromedary_jax.lm_eval on 2 processes x 4 fake CPU devices (jax.distributed on
    127.0.0.1, model sharded over both, mesh 1x4x2): the harness splits the requests by rank,
    and the results and every logged sample equal a one-process run (8 devices, same mesh);
    only process 0 writes and prints. The sampled task checks that seeds do not depend on
    the process count."""
    import subprocess
    import sys

    from test_multihost import LOCAL_DEVICES, NUM_PROCESSES, ROOT, _free_port

    from dromedary_jax.lm_eval import main

    tasks = "tiny_mc,tiny_ppl,tiny_gen,tiny_sample"

    def argv(out):
        return ["--model", "dromedary_jax", "--model_args",
                f"pretrained={bpe_folder},max_length={MAX_LENGTH},mesh=1x4x2",
                "--batch_size", "2", "--tasks", tasks, "--include_path", task_dir, "--log_samples",
                "--output_path", str(out)]

    port, procs = _free_port(), []
    for pid in range(NUM_PROCESSES):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
                   JAX_PLATFORMS="cpu", DROMEDARY_COORDINATOR=f"127.0.0.1:{port}",
                   DROMEDARY_NUM_PROCESSES=str(NUM_PROCESSES), DROMEDARY_PROCESS_ID=str(pid),
                   TOKENIZERS_PARALLELISM="false")
        log = open(tmp_path / f"process{pid}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "dromedary_jax.lm_eval"] + argv(tmp_path / "multi" / str(pid)),
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        main(argv(tmp_path / "single"))  # meanwhile, here: one process, 8 devices
    finally:
        for p, log in procs:
            try:
                p.wait(timeout=600)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
    logs = [(tmp_path / f"process{pid}.log").read_text() for pid in range(NUM_PROCESSES)]
    for pid, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{logs[pid][-4000:]}"
    assert not (tmp_path / "multi" / "1").exists()  # only process 0 writes
    assert "|tiny_mc" in logs[0] and "|tiny_mc" not in logs[1]
    assert "Building contexts for tiny_mc on rank 1" in logs[1]  # the harness split the docs
    ref, ref_samples = _result_files(tmp_path / "single")
    got, got_samples = _result_files(tmp_path / "multi" / "0")
    for task in tasks.split(","):
        for k, v in ref[task].items():
            if isinstance(v, float) and "stderr" not in k:
                assert math.isclose(got[task][k], v, rel_tol=1e-5, abs_tol=1e-5), (task, k)
        assert sorted(got_samples[task]) == sorted(ref_samples[task])
        for doc_id, s in ref_samples[task].items():
            # filtered_resps: the responses the metrics read (a process whose share is short
            # repeats its last request as padding, which appends to that request's "resps")
            a, b = got_samples[task][doc_id]["filtered_resps"], s["filtered_resps"]
            if task in ("tiny_gen", "tiny_sample"):
                assert a == b, (task, doc_id)
            else:  # the harness writes every response as strings: "-12.5", "False"
                for x, y in zip(_leaves(a), _leaves(b), strict=True):
                    assert x == y if y in ("True", "False") else math.isclose(
                        float(x), float(y), rel_tol=0, abs_tol=1e-5), (task, doc_id, a, b)


def _leaves(x):
    return [y for item in x for y in _leaves(item)] if isinstance(x, (list, tuple)) else [x]
