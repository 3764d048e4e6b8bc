"""The SELF-ALIGN stages, one module each; the registry (:data:`STAGES`) is in
:mod:`dromedary_jax.pipeline.runner`."""
