"""Fakes for tests and the toy demo: the scripted generator (realistic stage 1-2 text without a
model) and the tiny SentencePiece tokenizer trained on data/ (``builtin:demo``). Nothing here is
imported by the library's own layers except through the config (``model.kind = "scripted"``,
``model.tokenizer = "builtin:demo"``)."""
