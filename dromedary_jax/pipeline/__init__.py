"""The SELF-ALIGN pipeline: the method's stages and what they share.

    runner.py        the stage registry (STAGES) and the one lifecycle of every stage
    stage.py         the Stage protocol, StageContext, StageResult
    stages/          one module per stage: self_instruct (1), self_align (2), engrave (3),
                     verbose_clone (4), evaluate (5, opt-in)
    defaults.py      the config schema: default sections, rules, complete() / validate()
    data_files.py    the project's data/ files: principles, exemplars, seeds, templates
    principles.py    the principle prompt (principles + exemplars) and its ablations
    filters.py       instruction filters and ROUGE-L dedup (stage 1)
    answer_filters.py  the answer cleaning and degeneration checks stages 2 and 4 share
    generator.py     the Generator interface and the model-backed generator
    generation.py    the resumable generation loop (records -> shards)
    records.py       resumable JSONL shards, the config lock, the manifest
    resources.py     the model / tokenizer / generator a run builds once from the config
    finetune.py      what stages 3 and 4 share: SFT files, fine-tune, save
    dry_run.py       ``--dry_run``: the analytical memory plan and the stage plan
    reports/         funnel tables and charts, report.md, the base-vs-aligned table

docs/architecture.md draws the layers and the data flow of one run. Nothing is imported here,
so ``import dromedary_jax.pipeline`` stays cheap.
"""
