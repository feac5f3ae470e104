"""What every ``res2det`` subcommand shares: plain-text tables and the user-error convention."""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from ..errors import Res2DetError, Res2DetWarning
from ..interrupt import Interrupted


def text_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def parse_size(text: str, *, multiple_of: int = 1, square_ok: bool = True) -> tuple[int, int]:
    """``--size`` as every subcommand takes it: ``HEIGHTxWIDTH`` (``800x1333``), as tensors are laid out, or one
    number for a square; each side 16..8192 and a multiple of ``multiple_of``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not m or (m[2] is None and not square_ok):
        example = "800x1344" if multiple_of > 1 else "800x1333"
        raise Res2DetError(f"--size must be HEIGHTxWIDTH (e.g. {example}){' or one number' if square_ok else ''}, "
                           f"got {text!r}")
    h, w = int(m[1]), int(m[2] or m[1])
    if not (16 <= h <= 8192 and 16 <= w <= 8192):
        raise Res2DetError(f"--size {text!r}: height and width must lie in 16..8192")
    if h % multiple_of or w % multiple_of:
        raise Res2DetError(f"--size {text!r}: height and width must be multiples of {multiple_of}")
    return h, w


def check_output(path: str | os.PathLike, flag: str, *, folder: bool = False) -> Path:
    """Before any work: ``path`` can be written as a file (or, with ``folder``, created as a folder); one clear
    error otherwise (a folder where a file goes, a file on the way, no write permission)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise Res2DetError(f"{flag} {path}: is a {'file' if folder else 'folder'}; {flag} takes the path of a "
                           f"{'folder' if folder else 'file'} to write")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise Res2DetError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Res2DetError(f"{flag} {path}: {parent} is not writable")
    return path


OPTIMIZE_HELP = ("fp32 PyTorch with BN folded into the convs and each layer's fastest kernel, measured once per "
                 "machine, model and input shape and cached (the first run measures: about 2 minutes for an R2-101 "
                 "detector on 2 CPU cores); outputs agree with the exact path within float rounding")


def optimized(model, example):
    """``--optimize``: the model in inference form with its cached (or now measured) kernel plan, saying which."""
    from ..optimize import optimize_for_inference

    model = optimize_for_inference(model, example)
    plan = model.kernel_plan
    where = (f"from {plan['file']}" if plan["cached"] else
             f"measured in {plan['selection_s']:.0f} s, kept in {plan['file']}")
    print(f"--optimize: kernel plan {where}")
    return model


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """res2det's own warnings as one ``res2det: warning:`` line; others as Python prints them."""
    if issubclass(category, Res2DetWarning):
        print(f"res2det: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _one_line(message: object) -> str:
    """A message as one line: some library errors quoted in ours span several (pickle's, for one)."""
    return " ".join(str(message).split("\n"))


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run; a user error (``Res2DetError``) is one line on stderr and exit code 2, no traceback; so
    is a failed write (disk full, read-only folder), naming the file."""
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args.func(args)
    except Res2DetError as e:
        print(f"res2det: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        where = e.filename or "writing the output"
        print(f"res2det: error: {where}: {_one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except Interrupted as e:  # stopped at a safe point by SIGTERM / SIGINT (``res2det.interrupt``)
        if str(e):
            print(f"res2det: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C where nothing needs saving (before the work starts, or in a short command)
        print("res2det: SIGINT: stopped", file=sys.stderr)
        return 130
    return 0


FAST_HELP = ("the fastest path installed here whose AP on the main-job model stays within 0.01 of fp32 "
             "(res2det.deploy.fast: OpenVINO bf16 or the bf16 weights where the CPU has native bf16, else OpenVINO "
             "int8 (with NNCF installed), OpenVINO fp32, ONNX Runtime, the --optimize path); says which it chose")


def bf16_form(model, example):
    """``--precision bf16``: the detector with its weights converted to bf16 once (BN folded) where the CPU has
    native bf16; else, after one warning line, the model as it is (fp32)."""
    from ..inference import autocast_dtype
    from ..optimize import optimize_for_inference

    if autocast_dtype("bf16", next(model.parameters()).device) is None:
        return model
    return optimize_for_inference(model, example, precision="bf16")


def fastest_path(model, *, model_name: str, example, calibration=None):
    """``--fast``: ``res2det.deploy.fast.fastest_path``, saying which path it chose."""
    from ..deploy.fast import fastest_path as choose

    chosen, why = choose(model, model_name=model_name, example=example, calibration=calibration)
    print(f"--fast: {why}")
    return chosen
