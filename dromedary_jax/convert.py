"""Convert a model folder.

    python -m dromedary_jax.convert --src DIR --dst DIR [--to hf|orbax] [--dtype float32] \\
        [--mesh 1,-1,1] [--max_shard_size 5GB] [--overwrite]

``--src`` is a Hugging Face folder, a Meta folder, a dromedary_jax checkpoint or a LLaMA
``.gguf`` file (see ``load_model``; GGUF weights are dequantized). ``--to hf`` (default) writes a
Hugging Face folder in ``--dtype`` (float32/bfloat16/float16), plus the GGUF's tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with its BOS rule and chat template) when the
source is a GGUF file; ``--to orbax`` writes this project's checkpoint with parameters in
``--dtype`` (float32/bfloat16). ``--mesh`` (data,fsdp,tensor with one -1 allowed, as
``config.model.mesh``; e.g. ``1,-1,2``) shards the model over the local devices while
converting. ``--dst`` must be a new or empty folder unless ``--overwrite`` (both formats). Flags
are absl's (``--name value`` or ``--name=value``; ``--overwrite`` / ``--nooverwrite``). Bad input
prints one ``error:`` line and exits with 2.
"""
from __future__ import annotations

import math
import os
import sys

from dromedary_jax.errors import UserError, absl_cli_flags, cli_main, deprecated

PROG = "python -m dromedary_jax.convert"


def parse_mesh(text: str | None):
    """``--mesh``: ``"1,-1,2"`` (data,fsdp,tensor) -> tuple, None / "" -> None. The old
    ``"fsdp=-1,tensor=2"`` form still works for one release (one deprecation line; axes it
    does not name are 1)."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if parts and all("=" in p for p in parts):
            from dromedary_jax.sharding import MESH_AXES

            named = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
            unknown = sorted(set(named) - set(MESH_AXES))
            if unknown:
                raise UserError(f"--mesh {text!r}: unknown axis {unknown}; give data,fsdp,tensor, "
                                f"e.g. 1,-1,2")
            shape = tuple(named.get(a, 1) for a in MESH_AXES)
            deprecated(f"--mesh {text}", f"--mesh {','.join(map(str, shape))} (data,fsdp,tensor)")
            return shape
        return tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. 1,-1,2") from None


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"123"`` (bytes) -> bytes."""
    t = text.strip().upper()
    for unit, mult in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024), ("B", 1)):
        if t.endswith(unit):
            t, m = t[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        x = float(t) * m
    except ValueError:
        raise UserError(f"--max_shard_size {text!r}: expected e.g. 5GB, 500MB or bytes") from None
    if not math.isfinite(x):
        raise UserError(f"--max_shard_size {text!r}: must be a finite size, e.g. 5GB")
    n = int(x)
    if n <= 0:
        raise UserError(f"--max_shard_size {text!r} must be > 0")
    return n


def same_folder(a: str, b: str) -> bool:
    """``a`` and ``b`` are the same folder (through symlinks, bind mounts, ``..``)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _define_flags(fv, argv) -> None:
    from absl import flags

    def define(kind, name, default, help_text, *args):
        getattr(flags, f"DEFINE_{kind}")(name, default, *args, help_text, flag_values=fv)

    define("string", "src", None, "HF, Meta or dromedary_jax checkpoint folder, or a .gguf file "
           "(required)")
    define("string", "dst", None, "output folder (required)")
    define("enum", "to", "hf", "output format", ["hf", "orbax"])
    define("enum", "dtype", "float32", "stored dtype (float16 only for --to hf)",
           ["float32", "bfloat16", "float16"])
    define("string", "mesh", None, "mesh data,fsdp,tensor (one -1 allowed), e.g. 1,-1,2 "
           "(default: one device)")
    define("integer", "vocab_size", None, "Meta folders whose params.json has vocab_size=-1 and "
           "no tokenizer.model")
    define("integer", "max_seq_len", None, "context length to record (default: the source's; Meta "
           "folders: inferred from the family, LLaMA-1 2048 ... 3.1 131072)")
    define("string", "max_shard_size", "5GB", "--to hf: split files above this (e.g. 5GB, 500MB)")
    define("bool", "overwrite", False, "write into a --dst that is not empty (replacing the model "
           "files there)")


@cli_main
def main(argv=None) -> int:
    """Run the converter with ``argv``: the arguments after the program name (default
    ``sys.argv[1:]``), e.g. ``main(["--src", "m.gguf", "--dst", "out"])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = absl_cli_flags([PROG, *argv], _define_flags, cli="convert", usage=__doc__)
    for name in ("src", "dst"):
        if not args[name].value:
            raise UserError(f"--{name} is required (see --help)")
    if args.to == "orbax" and args.dtype == "float16":
        raise UserError("--to orbax stores float32 or bfloat16 parameters, not float16")
    if same_folder(args.src, args.dst):
        raise UserError(f"--dst {args.dst} is the same folder as --src")
    mesh = parse_mesh(args.mesh)
    max_shard = parse_size(args.max_shard_size)

    from dromedary_jax.output_paths import is_nonempty_dir, make_out_dir

    if not args.overwrite and is_nonempty_dir(args.dst):
        raise UserError(f"--dst {args.dst} is not empty; pass --overwrite to replace the model "
                        "files in it, or choose a new or empty folder")
    created = make_out_dir(args.dst, "--dst")  # now: a bad --dst fails before the slow load
    try:
        return _convert(args, mesh, max_shard)
    except BaseException:
        if created and not is_nonempty_dir(args.dst):
            try:
                os.rmdir(args.dst)  # leave no empty folder behind a failed conversion
            except OSError:
                pass
        raise


def _convert(args, mesh, max_shard) -> int:
    from dromedary_jax.checkpoint import detect_format, load_model, save_checkpoint, save_hf

    # bfloat16 output: hold bfloat16 params (half the memory; the same single rounding).
    param_dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
    tokenizer = None
    if args.to == "hf" and detect_format(args.src) == "gguf":
        from dromedary_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.src)  # before the slow part: a bad vocabulary fails early
    model = load_model(args.src, mesh=mesh, param_dtype=param_dtype, vocab_size=args.vocab_size,
                       max_seq_len=args.max_seq_len)
    if args.to == "hf":
        files = save_hf(model, args.dst, dtype=args.dtype, max_shard_bytes=max_shard,
                        overwrite=True)  # main() refused a non-empty --dst without --overwrite
        extra = ""
        if tokenizer is not None:
            import jax

            from dromedary_jax.tokenizer import save_tokenizer

            if jax.process_index() == 0:  # the process that wrote the weights
                save_tokenizer(tokenizer, args.dst)
            extra = " and the GGUF's tokenizer"
        print(f"wrote Hugging Face folder {args.dst} ({len(files)} safetensors file(s), "
              f"{args.dtype}){extra}")
    else:
        save_checkpoint(model, args.dst, overwrite=args.overwrite)
        print(f"wrote dromedary_jax checkpoint {args.dst} ({args.dtype} params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
