"""``hipt-convert``: the released PyTorch weights <-> our Orbax checkpoints.

    hipt-convert vit256_small_dino.pth ckpt/vit256               # teacher backbone, arch auto
    hipt-convert vit4k_xs_dino.pth ckpt/vit4k --keep-head        # + DINO head (resume pretraining)
    hipt-convert --to-torch ckpt/vit256 vit256_roundtrip.pth     # back to the reference layout

The conversion itself is hipt_jax.convert (to_orbax, to_torch). Exit codes: 0 ok, 2 bad usage
or input (hipt_jax.cli.flags).
"""
from __future__ import annotations

import os
import sys

from hipt_jax.cli import flags

PROG = "hipt-convert"
WEIGHT_FILE_EXTENSIONS = frozenset((".safetensors", ".bin", ".ckpt", ".msgpack", ".pkl"))


def build_parser() -> flags.Parser:
    p = flags.Parser(
        prog=PROG,
        description="Convert the released HIPT PyTorch checkpoints to hipt-jax Orbax directories, and back.")
    p.add_argument("src", type=flags.path_arg, help="SRC.pth (forward) or a converted directory (--to-torch)")
    p.add_argument("dst", type=flags.path_arg,
                   help="DST_DIR (forward, must not exist or be empty) or DST.pth (--to-torch)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="which network of a DINO checkpoint to take (default: teacher, as the reference)")
    p.add_argument("--arch", choices=["auto", "vit256", "vit4k", "vit256_tiny", "vit4k_tiny"], default="auto",
                   help="expected architecture (default: detect from the tensors)")
    p.add_argument("--keep-head", action="store_true", help="also keep the DINO head (for resuming pretraining)")
    p.add_argument("--to-torch", action="store_true", help="reverse: converted directory -> reference .pth")
    return p


def _run(args) -> int:
    from hipt_jax.convert import to_orbax, to_torch

    need = max(flags.MIN_FREE_BYTES, _size(args.src))  # the output holds a subset of the input's tensors
    if args.to_torch:
        _check_to_torch(args)
        flags.check_output_file(args.dst, need)
    else:
        ext = os.path.splitext(args.dst.rstrip("/\\"))[1].lower()
        if not os.path.exists(args.dst) and ext in flags.FILE_EXTENSIONS | WEIGHT_FILE_EXTENSIONS:
            # it made a directory named like a weights file, which the user then looked for a file in
            raise flags.UsageError(f"{args.dst}: names a {ext} file, but hipt-convert writes a directory "
                                   "(arch.json + Orbax state; --vit256/--vit4k take it as it is); give a "
                                   "directory name (--to-torch writes a .pth)")
        flags.check_output_dir(os.path.dirname(os.path.abspath(args.dst)), need)
    if args.to_torch:
        info = to_torch(args.src, args.dst)
        print(f"wrote {info['dst']}: {info['arch']}, {info['tensors']} tensors in the reference layout")
    else:
        info = to_orbax(args.src, args.dst, which=args.which, arch=args.arch, keep_head=args.keep_head)
        head = " + DINO head" if info["head"] else ""
        cast = f" (stored as float32; the file held {'/'.join(info['cast_from'])})" if info["cast_from"] else ""
        which = f" {info['which']}" if info["which"] else ""  # a plain state dict has no teacher
        print(f"wrote {info['dst']}: {info['arch']}{which} backbone, {info['params']:,} parameters{head}{cast}")
        if info["not_converted"]:
            print(f"{PROG}: note: not converted: {info['not_converted']}", file=sys.stderr)
        if info["ignored"]:  # e.g. timm's state_dict_ema beside state_dict
            print(f"{PROG}: note: converted '{info['container']}' of {args.src}; also in the file and not "
                  f"converted: {', '.join(info['ignored'])} (save that one on its own to convert it)",
                  file=sys.stderr)
    return flags.EXIT_OK


def _check_to_torch(args) -> None:
    """--to-torch writes one network (the converted directory's) to a new .pth: the forward
    direction's options do not apply, and an existing file (often the original checkpoint,
    with student, optimizer and head) is never replaced."""
    given = [f for f, on in (("--which", args.which != "teacher"), ("--arch", args.arch != "auto"),
                             ("--keep-head", args.keep_head)) if on]
    if given:
        raise flags.UsageError(f"{', '.join(given)}: options of the forward conversion; --to-torch writes "
                               "what the converted directory holds")
    if os.path.isfile(args.src):
        raise flags.UsageError(f"{args.src}: is a file; --to-torch converts a converted directory "
                               "(hipt-convert's output) back to a .pth")
    if os.path.lexists(args.dst):
        raise flags.UsageError(f"{args.dst}: already exists; --to-torch does not overwrite a checkpoint "
                               "(remove it or choose another name)")


def _size(path: str) -> int:
    """Bytes of a file, or of every file under a directory (0 when missing: the run names it)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


main = flags.command(PROG, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
