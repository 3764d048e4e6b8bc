"""What stages 3 and 4 share: turn (question, answer) records into SFT JSONL under a meta-prompt,
split off a held-out set, fine-tune with ``training.run_sft`` (which resumes from its own
checkpoints after a kill) and save the resulting model once."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from dromedary_jax.errors import UserError
from dromedary_jax.pipeline import data_files as D
from dromedary_jax.pipeline.records import (StageDir, finetune_fingerprint, read_jsonl, stable_int,
                                            write_jsonl_atomic)

MODEL_MARKER = "dromedary_checkpoint.json"  # written last by save_checkpoint
ADAPTER_DIR = "adapter"  # a LoRA fine-tune's PEFT adapter folder, next to its merged model


def question_text(row: Mapping) -> str:
    """The user turn of a record: instruction, plus its input after a blank line if any."""
    inp = str(row.get("input") or "")
    return str(row["instruction"]) + (("\n\n" + inp) if inp else "")


def meta_template(path: str, key: str, assistant: D.Assistant) -> str:
    """A meta-prompt file rendered for the assistant, keeping ``{prompt}`` for the trainer."""
    t = D.Template.load(path, key, ("assistant", "cutoff", "prompt"))
    text = t.render(assistant=assistant.name, cutoff=assistant.cutoff)
    if "{prompt}" not in text:
        raise UserError(f"config.{key}: {path} has no {{prompt}} placeholder")
    return text


def chat_template(meta_prompt: str, add_bos: bool) -> str:
    """A Jinja ``chat_template`` (transformers' ``apply_chat_template``) that renders a
    conversation in the format a stage fine-tuned on: the first user turn inside
    ``meta_prompt`` (its ``{prompt}``), each assistant turn as ``" " + content`` (the SFT
    responses start with a space), later user turns as ``"\n\n" + <user prefix> + content +
    <assistant header>`` where the user prefix is the meta-prompt's text after its last blank
    line before ``{prompt}`` (e.g. ``"User: "``) and the assistant header what follows
    ``{prompt}`` (e.g. ``"\n\nDromedary:"``). With ``add_bos`` the BOS token comes first, as in
    training (``apply_chat_template`` adds no special tokens itself). Single-turn prompts render
    exactly ``meta_prompt.replace("{prompt}", question)``, the model's training prompt."""
    before, after = meta_prompt.split("{prompt}", 1)
    user_prefix = before.rsplit("\n\n", 1)[-1]

    def lit(text: str) -> str:  # a Jinja string literal (JSON's escapes are Jinja's)
        return json.dumps(text)

    return ("{%- if messages|length == 0 -%}{{ raise_exception('no messages') }}{%- endif -%}"
            + ("{{- bos_token -}}" if add_bos else "")
            + "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{%- if loop.first -%}}{{{{- {lit(before)} -}}}}"
            f"{{%- else -%}}{{{{- {lit(chr(10) * 2 + user_prefix)} -}}}}{{%- endif -%}}"
            f"{{{{- message['content'] -}}}}{{{{- {lit(after)} -}}}}"
            "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] -}}"
            "{%- else -%}{{ raise_exception('only user and assistant turns') }}"
            "{%- endif -%}{%- endfor -%}")


def save_model_tokenizer(tokenizer, folder: str, meta_prompt: str) -> None:
    """The tokenizer a model folder was trained with, and its chat template (see
    :func:`chat_template`), so that transformers' ``AutoTokenizer`` and the eval CLI open the
    folder without ``--tokenizer``."""
    from dromedary_jax.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, folder,
                   chat_template=chat_template(meta_prompt, bool(getattr(tokenizer, "add_bos", True))))


def save_adapter(lora, lora_cfg, model_config, tokenizer, meta_prompt: str, out_dir: str, *,
                 base_model: str | None = None, hosts=None, overwrite: bool = False) -> str | None:
    """A LoRA fine-tune's adapters as a PEFT adapter folder ``out_dir`` (``adapter_config.json``
    + ``adapter_model.safetensors``, see ``checkpoint.peft_export``) with the tokenizer and chat
    template of ``meta_prompt`` (:func:`save_model_tokenizer`; none when ``tokenizer`` is None);
    returns ``out_dir``, or None (nothing written) when ``lora`` is None (a full fine-tune).

    ``lora_cfg``: the fine-tune's ``lora`` section (``alpha``, ``dropout``). ``base_model``: the
    base checkpoint the adapters apply to (a local path is made absolute), recorded as
    ``base_model_name_or_path``; None for a randomly initialised preset. Written into
    ``out_dir + ".tmp"`` and renamed into place, so a kill never leaves half a folder; a finished
    folder is kept unless ``overwrite``. Every process calls this (adapters are gathered);
    process 0 writes."""
    import shutil

    from dromedary_jax.checkpoint.peft_export import CONFIG_FILE, save_peft_adapter
    from dromedary_jax.distributed import Hosts

    if lora is None:
        return None
    hosts = hosts or Hosts.from_jax()
    if os.path.exists(os.path.join(out_dir, CONFIG_FILE)) and not overwrite:
        return out_dir
    if base_model and os.path.exists(base_model):
        base_model = os.path.abspath(base_model)
    tmp = out_dir + ".tmp"
    if hosts.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    hosts.barrier(f"{out_dir}-adapter-start")
    save_peft_adapter(lora, model_config, tmp, alpha=float(lora_cfg.alpha),
                      dropout=float(lora_cfg.get("dropout", 0.0)),
                      base_model_name_or_path=base_model or None)
    if hosts.is_main:
        if tokenizer is not None:
            save_model_tokenizer(tokenizer, tmp, meta_prompt)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    hosts.barrier(f"{out_dir}-adapter-done")
    return out_dir


def split_heldout(rows: Sequence[Mapping], fraction: float, seed: int):
    """Deterministic split by a hash of (seed, id): the same id always lands on the same side."""
    if not 0 <= fraction < 1:
        raise UserError(f"heldout_fraction={fraction} must be in [0, 1)")
    cut = int(fraction * 10_000)
    train, held = [], []
    for r in rows:
        (held if stable_int(f"{seed}|{r['id']}") % 10_000 < cut else train).append(r)
    if not train:
        raise UserError("no training examples left after the held-out split; lower heldout_fraction")
    return train, held


def write_sft_files(stage: StageDir, rows: Sequence[Mapping], fraction: float, seed: int):
    """``train.jsonl`` / ``heldout.jsonl`` of {id, prompt, response} (process 0 writes)."""
    train, held = split_heldout(rows, fraction, seed)
    files = {"train": stage.file("sft_train.jsonl"), "heldout": stage.file("sft_heldout.jsonl")}
    if stage.hosts.is_main:
        write_jsonl_atomic(files["train"], train)
        write_jsonl_atomic(files["heldout"], held)
    stage.hosts.barrier(f"{stage.stage}-sft-files")
    return files, len(train), len(held)


def train_config(section, template: str):
    """The stage's fine-tune ConfigDict with the rendered meta-prompt and our field names."""
    import ml_collections

    cfg = ml_collections.ConfigDict(section.to_dict())
    with cfg.unlocked():
        cfg.data.template = template
        cfg.data.template_file = ""
        cfg.data.prompt_field, cfg.data.response_field, cfg.data.id_field = "prompt", "response", "id"
    return cfg


def finetune_and_save(stage: StageDir, train_cfg, model, tokenizer, files: Mapping[str, str],
                      n_heldout: int, base_model: str | None = None) -> dict:
    """Fine-tune (resuming from ``<stage>/train/checkpoints`` if a run was interrupted) and save
    the final weights to ``<stage>/model``, and for a LoRA fine-tune the adapters alone as a PEFT
    folder ``<stage>/adapter`` (:func:`save_adapter`; ``base_model``: the base checkpoint path,
    None for a random preset); returns metrics for the manifest. ``model`` comes in the dtype
    ``resources.finetune_param_dtype`` gives (float32 masters for a full fine-tune, the frozen
    base as sampling holds it for LoRA); ``<stage>/model`` is saved in the dtype the trainer
    returns (``training.loop.final_params``: a LoRA merge of a bfloat16 run is bfloat16)."""
    from dromedary_jax.checkpoint import save_checkpoint
    from dromedary_jax import training
    from dromedary_jax.training.config import config_path

    model_dir = stage.file("model")
    with config_path(f"config.{stage.stage}.train."):  # run_sft names keys as in its own cfg
        result = training.run_sft(train_cfg, model, tokenizer, files["train"], stage.file("train"),
                                  eval_files=files["heldout"] if n_heldout else None)
    if not os.path.exists(os.path.join(model_dir, MODEL_MARKER)):
        save_checkpoint(result.model, model_dir, overwrite=True)
    if stage.hosts.is_main:
        save_model_tokenizer(tokenizer, model_dir, train_cfg.data.template)
    stage.hosts.barrier(f"{stage.stage}-tokenizer")
    save_adapter(result.lora, train_cfg.lora, result.model.config, tokenizer,
                 train_cfg.data.template, stage.file(ADAPTER_DIR), base_model=base_model,
                 hosts=stage.hosts)
    return {"train_steps": result.step, "final_train_loss": result.final_loss,
            "heldout_loss": result.eval_loss, "metrics": result.metrics_path, "model": model_dir}


def kept_answers(workdir: str) -> list[dict]:
    """Stage 2's kept (question, answer) records (``self_align/kept.jsonl``)."""
    return read_jsonl(os.path.join(workdir, "self_align", "kept.jsonl"))


def section_fingerprint(section) -> dict:
    """What of a fine-tune stage's section changes its results: not the sampler batch size nor
    the fine-tune's checkpoint/eval/metrics intervals, progress, mesh or dataset-reading knobs."""
    d = section.to_dict()
    d.pop("batch_size", None)
    if "train" in d:
        d["train"] = finetune_fingerprint(section.train)
    return d
