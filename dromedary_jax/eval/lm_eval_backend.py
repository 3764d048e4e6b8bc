"""lm-evaluation-harness backend: ``--model dromedary_jax`` runs any harness task on our model.

    python -m dromedary_jax.lm_eval --model dromedary_jax \\
        --model_args pretrained=DIR,dtype=bfloat16,mesh=1x-1x1 --tasks hellaswag ...

    import lm_eval, dromedary_jax.eval.lm_eval_backend   # the import registers "dromedary_jax"
    lm_eval.simple_evaluate(model="dromedary_jax", model_args={"pretrained": DIR}, tasks=[...])

lm-evaluation-harness (0.4.x) finds model backends only in its own table (no plugin entry
points), so the backend is registered when this module is imported; ``python -m
dromedary_jax.lm_eval`` imports it and then runs the harness's own command line, with the same
arguments as ``lm_eval``.

What each request type does, and how it matches ``--model hf`` (lm_eval/models/huggingface.py):

- ``loglikelihood``: the harness's own split (this class is a ``TemplateLM``, so its
  ``loglikelihood`` / ``_encode_pair`` run unchanged): trailing spaces of the context move to
  the continuation, ``context_ids = encode(context)``, ``continuation_ids = encode(context +
  continuation)[len(context_ids):]``, BOS as the tokenizer's own rule says (``hf`` follows the
  HF tokenizer; ``add_bos_token`` forces it on / off as ``hf``'s argument of that name does);
  an empty context is the prefix token (BOS, else EOS). The pairs are scored by
  :func:`dromedary_jax.eval.scorer.loglikelihoods` (packed rows, each context run once; too-long
  pairs lose context tokens from the left, as ``hf`` does): ``(sum log p, is greedy)``.
- ``loglikelihood_rolling``: the document's ids (``encode(text)``, BOS by the rule, as ``hf``)
  cut into the harness's disjoint windows (``utils.get_rolling_token_windows`` with the prefix
  token, ``max_length`` and context 1, then ``make_disjoint_window``), every window scored by
  the same scorer, summed per document.
- ``generate_until``: :func:`dromedary_jax.generate_text` per distinct ``gen_kwargs``, normalised
  as the harness does (``normalize_gen_kwargs``): stop strings = ``until``, ``max_gen_toks``
  (default 256), greedy unless ``do_sample`` (then ``temperature``, ``top_p``, ``top_k``).
  Contexts longer than ``max_length - max_gen_toks`` tokens keep their last tokens (as ``hf``).
  One difference from ``hf``: the returned text is what the generated tokens add after the
  prompt, so with a SentencePiece tokenizer (LLaMA-1/2) a generation starting with a space
  keeps it, where ``hf`` decodes the new tokens alone and drops it (harness tasks normally strip
  or regex-match the answer; vLLM's backend keeps the space as we do); and a run of byte tokens
  that is not valid UTF-8 is decoded as sentencepiece does (one U+FFFD per invalid byte, where
  ``hf``'s decoder replaces every byte of the run). With a byte-level BPE tokenizer (SmolLM2,
  LLaMA-3) the two are the same text. Sampling is seeded per request from
  ``seed`` and (task, document, request index, repeat), so a text does not depend on the batch,
  the order or the number of processes.

Multi-host (a model sharded over several processes, ``mesh`` over all devices): ``rank`` /
``world_size`` are ``jax.process_index()`` / ``jax.process_count()``, so the harness gives each
process its share of the requests. Scoring gathers every process's token pairs, every process
runs the same scorer steps over the whole mesh, and each keeps its own results; generation runs
each process's own prompts in the same sampler calls (the sampler's multi-host mode).
``gather_object`` / ``all_gather`` / ``barrier`` go through JAX's multi-host collectives. The
harness's own multi-process bookkeeping imports torch (any CPU build is enough).
``python -m dromedary_jax.lm_eval`` starts ``jax.distributed`` first (``DROMEDARY_DISTRIBUTED=auto``
or ``DROMEDARY_COORDINATOR`` & co., see :mod:`dromedary_jax.distributed`).

Not supported: ``--apply_chat_template`` (the harness's chat rendering needs a HF tokenizer
object), multimodal tasks.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import os
import pickle
from collections import defaultdict
from typing import Sequence

from dromedary_jax.errors import UserError

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as e:  # pragma: no cover - depends on the environment
    raise UserError(f"the lm-evaluation-harness backend needs lm-eval: pip install lm-eval "
                    f"(tested with 0.4.13) ({e})") from None

log = logging.getLogger(__name__)

MODEL_NAME = "dromedary_jax"
DEFAULT_MAX_GEN_TOKS = 256  # as --model hf
# gen_kwargs the sampler understands; any other key is ignored with a warning
_SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


def parse_mesh(mesh):
    """``mesh`` model argument -> what ``dj.load_model`` takes: None, a ``jax.sharding.Mesh``,
    a dict or 3-tuple, or the string ``"DxFxT"`` (data x fsdp x tensor, one -1 allowed, e.g.
    ``1x-1x1``; written with ``x`` because the harness splits ``--model_args`` at commas)."""
    if mesh is None or mesh == "":
        return None
    if isinstance(mesh, str):
        parts = mesh.replace(":", "x").split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if len(shape) != 3:
            raise UserError(f"model_args mesh={mesh!r}: expected data x fsdp x tensor, e.g. "
                            f"mesh=1x-1x1 (one -1 allowed)")
        return shape
    return mesh


def _positive_int(name: str, v, allow_none: bool = True):
    if v is None and allow_none:
        return None
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"model_args {name}={v!r}: expected a positive integer")
    return int(v)


def _bool_or_none(name: str, v):
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[v.lower()]
    raise UserError(f"model_args {name}={v!r}: expected true or false")


def _request_key(req, k: int) -> str:
    """A stable name of a request (task, document, index, repeat) that seeds its sampling."""
    return json.dumps([getattr(req, "task_name", None), getattr(req, "doc_id", None),
                       getattr(req, "idx", None), k])


@register_model(MODEL_NAME)
class DromedaryJaxLM(TemplateLM):
    """lm-evaluation-harness model backed by a dromedary_jax model and tokenizer.

    Model arguments (``--model_args key=value,...``):

    - ``pretrained`` (required): what :func:`dromedary_jax.load_model` takes: a HF, Meta or
      dromedary_jax (Orbax) checkpoint folder, or a llama.cpp ``.gguf`` file.
    - ``tokenizer``: tokenizer ``.model`` / ``tokenizer.json`` / ``.gguf`` / folder (default:
      ``pretrained``, which must then hold one; a ``.gguf`` carries its own).
    - ``dtype``: compute dtype, ``float32`` (default; ``auto`` means it too) or ``bfloat16``.
    - ``mesh``: ``DxFxT`` mesh shape (data x fsdp x tensor, e.g. ``1x-1x1``; default one device).
    - ``max_length``: context length in tokens for truncation, rolling windows and generation
      (default: the model's ``max_seq_len``, which for a HF folder is its
      ``max_position_embeddings``, as ``hf`` resolves it).
    - ``batch_size``: prompts per generation batch (the harness's ``--batch_size``, whose own
      default is 1; ``auto`` or none: 32). Scoring packs requests into rows instead:
    - ``batch_tokens`` (4096) / ``row_length`` (512): tokens per scoring step / packed row
      (see :func:`dromedary_jax.eval.scorer.loglikelihoods`).
    - ``add_bos_token``: force BOS on (true) / off (false) for every encoding (default: the
      tokenizer's own rule, as ``hf``); ``prefix_token_id``: the token an empty context /
      the first rolling window is conditioned on (default BOS, else EOS).
    - ``max_gen_toks`` (256): generation budget when a task gives none; ``seed`` (0): sampling
      seed of ``do_sample`` tasks.

    A bad argument raises :class:`dromedary_jax.UserError` (one line through
    ``python -m dromedary_jax.lm_eval``).
    """

    def __init__(self, pretrained=None, tokenizer=None, dtype: str = "float32", batch_size=None,
                 max_length=None, mesh=None, batch_tokens=4096, row_length=512,
                 add_bos_token=None, prefix_token_id=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
                 seed=0, max_batch_size=None, device=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"model_args: unknown argument(s) {', '.join(sorted(unknown))} for "
                            f"--model {MODEL_NAME} (known: pretrained, tokenizer, dtype, mesh, "
                            f"max_length, batch_size, batch_tokens, row_length, add_bos_token, "
                            f"prefix_token_id, max_gen_toks, seed)")
        if not pretrained:
            raise UserError(f"--model {MODEL_NAME} needs model_args pretrained=PATH (a HF / "
                            f"Meta / dromedary_jax checkpoint folder or a .gguf file)")
        import jax

        from dromedary_jax.checkpoint import load_model
        from dromedary_jax.tokenizer import load_tokenizer

        dtype = "float32" if dtype in (None, "auto") else str(dtype)
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"model_args dtype={dtype!r}: expected float32 or bfloat16")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = None
        self._batch_size = _positive_int("batch_size", batch_size) or 32
        self._batch_tokens = _positive_int("batch_tokens", batch_tokens, allow_none=False)
        self._row_length = _positive_int("row_length", row_length, allow_none=False)
        if self._row_length < 2:
            raise UserError(f"model_args row_length={row_length!r}: expected >= 2")
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks, allow_none=False)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"model_args seed={seed!r}: expected an integer")
        self._seed = int(seed)
        add_bos = _bool_or_none("add_bos_token", add_bos_token)
        max_length = _positive_int("max_length", max_length)
        mesh = parse_mesh(mesh)
        if prefix_token_id is not None and (isinstance(prefix_token_id, bool)
                                            or not isinstance(prefix_token_id, int)
                                            or prefix_token_id < 0):
            raise UserError(f"model_args prefix_token_id={prefix_token_id!r}: expected a token id")
        self.pretrained = os.fspath(pretrained)
        self.tokenizer_path = os.fspath(tokenizer or pretrained)
        self.dtype = dtype

        if not os.path.exists(self.pretrained):
            raise UserError(f"model_args pretrained={self.pretrained}: no such file or folder")
        if tokenizer is None and os.path.isdir(self.pretrained):
            from dromedary_jax.tokenizer import tokenizer_file_in

            if tokenizer_file_in(self.pretrained) is None:
                raise UserError(f"model_args pretrained={self.pretrained}: no tokenizer.model or "
                                f"tokenizer.json in the folder; pass tokenizer=PATH")
        tok = load_tokenizer(self.tokenizer_path)
        if add_bos is not None and bool(tok.add_bos) != add_bos:
            if add_bos and tok.bos_id is None:
                raise UserError(f"model_args add_bos_token=true: {self.tokenizer_path} has no "
                                f"BOS token")
            tok = copy.copy(tok)  # the sampler and encode() read the rule from the tokenizer
            tok.add_bos = add_bos
        self.tokenizer = tok
        self.model = load_model(self.pretrained, dtype=dtype, mesh=mesh)
        if getattr(tok, "vocab_size", 0) > self.model.config.vocab_size:
            raise UserError(f"tokenizer {self.tokenizer_path} has {tok.vocab_size} tokens but the "
                            f"model's vocab_size is {self.model.config.vocab_size}")
        self._max_length = max_length or int(self.model.config.max_seq_len)
        if prefix_token_id is not None and prefix_token_id >= self.model.config.vocab_size:
            raise UserError(f"model_args prefix_token_id={prefix_token_id}: not below the "
                            f"model's vocab_size {self.model.config.vocab_size}")
        self._custom_prefix = prefix_token_id
        self._rank = jax.process_index()
        self._world_size = jax.process_count()
        self._device = "cpu"  # what the harness gives torch for its multi-process counters
        if device not in (None, "cpu") and self._rank == 0:
            log.info("dromedary_jax runs on JAX's devices (%s); --device %s is ignored",
                     jax.devices()[0].platform, device)

    # ------------------------------------------------------------------ harness properties
    @property
    def eot_token_id(self) -> int:
        """EOS id (the harness's end-of-text token)."""
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        """Token an empty context / the first rolling window is conditioned on: the
        ``prefix_token_id`` argument, else BOS, else EOS (as ``--model hf``)."""
        if self._custom_prefix is not None:
            return self._custom_prefix
        bos = getattr(self.tokenizer, "bos_id", None)
        return int(bos) if bos is not None and bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Context length in tokens (``max_length`` argument, else the model's max_seq_len)."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Default number of new tokens for ``generate_until`` (``max_gen_toks`` argument)."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Prompts per generation batch (``batch_size`` argument, default 32)."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer path with ``/`` replaced by ``__`` (the harness keys caches by it)."""
        return self.tokenizer_path.replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded in the harness's results ``config``."""
        c = self.model.config
        return {"model_dtype": self.dtype, "model_max_seq_len": int(c.max_seq_len),
                "model_vocab_size": int(c.vocab_size), "tokenizer": self.tokenizer_path,
                "add_bos": bool(self.tokenizer.add_bos)}

    # ------------------------------------------------------------------ tokenization
    def _bos_text(self) -> str | None:
        bos = getattr(self.tokenizer, "bos_id", None)
        if bos is None or bos < 0 or not hasattr(self.tokenizer, "id_to_token"):
            return None
        text = self.tokenizer.id_to_token(bos)
        return text or None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, as ``--model hf`` encodes: ``add_special_tokens`` None = BOS
        by the tokenizer's rule (a string that already starts with the BOS token's text gets no
        second one: that text becomes the BOS id), True/False force it; ``left_truncate_len``
        keeps the last ids."""
        tok = self.tokenizer
        bos_text = self._bos_text()
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            ids = [int(tok.bos_id)] + list(tok.encode(string[len(bos_text):], bos=False))
        else:
            ids = list(tok.encode(string, bos=add_special_tokens))
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``tokens`` (our tokenizer's decode: bos/eos/pad always dropped;
        ``skip_special_tokens`` is accepted for the harness and ignored)."""
        return self.tokenizer.decode(list(tokens))

    # ------------------------------------------------------------------ multi-host
    def _allgather_objects(self, obj) -> list:
        """Every process's ``obj`` on every process (process order)."""
        if self._world_size <= 1:
            return [obj]
        from dromedary_jax.distributed import allgather_texts

        blob = base64.b64encode(pickle.dumps(obj)).decode("ascii")
        return [pickle.loads(base64.b64decode(p[0])) for p in allgather_texts([blob])]

    def gather_object(self, obj, dst: int = 0):
        """Every process's ``obj`` as a list on process ``dst``, None on the others."""
        objs = self._allgather_objects(obj)
        return objs if self._rank == dst else None

    def all_gather(self, tensor):
        """A scalar / array from every process, stacked on axis 0 (a torch tensor in, as the
        harness passes, gives a torch tensor out)."""
        if self._world_size <= 1:
            return tensor
        import numpy as np
        from jax.experimental import multihost_utils

        is_torch = hasattr(tensor, "detach")
        x = tensor.detach().cpu().numpy() if is_torch else np.asarray(tensor)
        out = np.asarray(multihost_utils.process_allgather(x))
        if is_torch:
            import torch

            return torch.as_tensor(out)
        return out

    def barrier(self) -> None:
        """Wait until every process reaches this point (no-op on one process)."""
        if self._world_size > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dromedary_jax.lm_eval_backend")

    # ------------------------------------------------------------------ scoring
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool
                     ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) per (context ids, continuation ids) pair of THIS process.
        Multi-host: every process scores all processes' pairs in the same calls."""
        from dromedary_jax.eval.scorer import loglikelihoods

        mine = len(pairs)
        offset = 0
        if self._world_size > 1:
            everyone = self._allgather_objects(pairs)
            offset = sum(len(p) for p in everyone[:self._rank])
            pairs = [pair for p in everyone for pair in p]
        if not pairs:
            return []
        out = loglikelihoods(self.model, pairs, batch_tokens=self._batch_tokens,
                             row_length=self._row_length, max_length=self._max_length,
                             progress=not disable_tqdm and self._rank == 0)
        return out[offset:offset + mine]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """``requests``: ``[((context, continuation), context_ids, continuation_ids)]`` from
        the harness's ``loglikelihood``; returns ``[(sum log p, is greedy)]`` in order."""
        pairs = [(list(c), list(x)) for _, c, x in requests]
        res = self._score_pairs(pairs, disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (``Instance.args == (text,)``): the sum over the
        harness's disjoint rolling windows of ``max_length`` tokens."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window,
                                 lm_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(string),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self._max_length, context_len=1)):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        scores = self._score_pairs(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling_args(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """Harness gen_kwargs -> (generate_text keywords, stop strings)."""
        if not isinstance(gen_kwargs, dict):
            raise UserError(f"generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self._max_gen_toks))
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        stops = [s for s in until if isinstance(s, str) and s]
        ignored = sorted(k for k in kw if k not in _SAMPLING_KEYS)
        if ignored and self._rank == 0:
            log.warning("dromedary_jax: gen_kwargs %s are not supported and are ignored",
                        ", ".join(ignored))
        greedy = not kw.get("do_sample") or float(kw.get("temperature") or 0.0) == 0.0
        top_k = kw.get("top_k")
        out = dict(max_new_tokens=int(kw["max_gen_toks"]),
                   temperature=0.0 if greedy else float(kw["temperature"]),
                   top_p=1.0 if greedy or kw.get("top_p") is None else float(kw["top_p"]),
                   top_k=0 if greedy or top_k is None or top_k < 0 else int(top_k))
        return out, stops

    def _fit_context(self, context: str, max_ctx: int) -> str:
        """The context, cut to its last ``max_ctx`` tokens when longer (as ``hf`` left-truncates
        its ids; here the kept ids are decoded back to text for the sampler)."""
        ids = self.tok_encode(context)
        if len(ids) <= max_ctx:
            return context
        log.warning("dromedary_jax: a generation context of %d tokens is cut to its last %d",
                    len(ids), max_ctx)
        return self.tokenizer.decode(ids[-max_ctx:])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text generated after each context (``Instance.args == (context, gen_kwargs)``),
        up to the first stop string of ``until`` (excluded), at most ``max_gen_toks`` tokens."""
        from dromedary_jax.sampling.api import generate_text

        seen: dict[int, int] = defaultdict(int)
        groups: dict[str, list[int]] = defaultdict(list)
        seeds = []
        for i, req in enumerate(requests):
            k = seen[id(req)]  # the harness repeats an Instance object `repeats` times
            seen[id(req)] += 1
            seeds.append(_request_key(req, k))
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        keys = sorted(groups)
        if self._world_size > 1:  # every process makes the same sampler calls, in one order
            keys = sorted({k for ks in self._allgather_objects(keys) for k in ks})
        out: list[str | None] = [None] * len(requests)
        for key in keys:
            idx = groups.get(key, [])
            gen_kwargs = requests[idx[0]].args[1] if idx else json.loads(key)
            kw, stops = self._sampling_args(gen_kwargs)
            max_ctx = self._max_length - kw["max_new_tokens"]
            if max_ctx < 1:
                raise UserError(f"generate_until: max_gen_toks={kw['max_new_tokens']} leaves no "
                                f"room for a context within max_length={self._max_length}")
            if not idx and self._world_size == 1:
                continue
            prompts = [self._fit_context(requests[i].args[0], max_ctx) for i in idx]
            texts = generate_text(self.model, self.tokenizer, prompts, stop=stops,
                                     ids=[seeds[i] for i in idx], seed=self._seed,
                                     batch_size=self._batch_size,
                                     progress=not disable_tqdm and self._rank == 0, **kw)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Not supported: always raises UserError (the harness's chat rendering needs a HF
        tokenizer object)."""
        raise UserError(f"--apply_chat_template is not supported by --model {MODEL_NAME}; "
                        f"write the prompt format into the task instead")


__all__ = ["DromedaryJaxLM", "MODEL_NAME", "parse_mesh"]
