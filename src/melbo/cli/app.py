"""The `melbo` application: the typer app, its consoles, the options and input parsing every command shares.

Errors a user can fix are `MelboError`s: `main` prints them as one line and exits with code 2. The commands
live one group per module (`melbo.cli.discover`, `.generate`, `.chat`, `.export`, `.report`, `.assess`, `.sweep`,
`.audit`, `.bench`); importing `melbo.cli` registers them all. Each is a thin layer over one library call.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Callable, List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from melbo.checks import is_utf8
from melbo.errors import MelboError
from melbo.positions import Positions, Spec
from melbo.settings import DEFAULTS, THREADS

app = typer.Typer(
    help="Mechanistically eliciting latent behaviours: unsupervised steering vectors and adapters for causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _flags_name_no_value() -> None:
    """Help shows `--open` rather than `--open <bool>`: typer 0.29 labels on/off flags with a type, which reads as
    if they took a value. The one place the CLI reaches into typer's help rendering."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_melbo_flags", False):
        return  # older typers print no type for flags

    def display_type_rich(self: TyperOption, ctx):  # type: ignore[no-untyped-def]
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._melbo_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_name_no_value()

ModelOpt = typer.Option(None, "--model", "-m", help="Embedded name, local HF directory, .gguf file or hub id.")
DeviceOpt = typer.Option("best", help="best (a CUDA GPU when one is visible, else cpu), cpu, cuda, cuda:N, or auto (spread over all GPUs).")
DtypeOpt = typer.Option("auto", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16.")
BlocksOpt = typer.Option(None, "--blocks-path", help="Dotted path of the decoder block list, for unknown architectures.")
ThreadsOpt = typer.Option(THREADS, "--threads", help="torch threads (default: the free cores; OMP_NUM_THREADS if set).")

# The training options `discover` and `diff` share: one object each, so flag, help and default cannot drift.
PromptsArg = typer.Argument(None, help="Prompts to train on (chat-formatted when the model has a template).")
PromptsFileOpt = typer.Option(None, help="File with one prompt per line.")
RunOutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<time>-<model>).")
NVectorsOpt = typer.Option(DEFAULTS.n_vectors, "--n-vectors", "-n", help="How many perturbations to learn.")
SourceOpt = typer.Option(None, help="Source block (default 8, or depth//3 for shallow models).")
TargetOpt = typer.Option(None, help="Target block (default depth-8).")
StepsOpt = typer.Option(DEFAULTS.steps, help="Optimiser steps per batch.")
PositionsOpt = typer.Option(DEFAULTS.positions, help="Token positions: all, last:K, or JSON per-prompt indices.")
BatchSizeOpt = typer.Option(DEFAULTS.batch_size, help="Perturbations trained together (checkpoint after each batch).")
SeedOpt = typer.Option(DEFAULTS.seed, help="Random seed.")
ChatOpt = typer.Option(None, "--chat/--raw", help="Use the chat template (default: if the model has one).")
SystemPromptOpt = typer.Option(None, "--system-prompt", help="Open every conversation with this system message (recorded with the model; resuming and replaying a run reuse it).")
CheckOpt = typer.Option(None, "--check", help="A checker that reads every completion into checks.json: arithmetic-cot, or module:function returning a melbo.judging.checkers.Verdict.")


def main() -> None:
    try:  # typer 0.2x parses with a vendored click; older typers use click itself
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import NoArgsIsHelpError, UsageError

    # A `timeout`, a scheduler or a plain `kill` ends a command as Ctrl-C does: finished work saved, one line
    # naming how to continue (Ray's workers otherwise printed pages of "SIGTERM received" traces).
    signal.signal(signal.SIGTERM, _interrupt)
    not_text = next((i for i, a in enumerate(sys.argv[1:], 1) if not is_utf8(a)), None)
    if not_text is not None:  # a prompt, label or path in another encoding: refused before any command reads it
        _fail(f"argument {not_text} is not UTF-8 text ({ascii(sys.argv[not_text])[:60]}): pass it as UTF-8")
    try:
        code = app(prog_name="melbo", standalone_mode=False)
    except MelboError as exc:
        _fail(str(exc))
    except NoArgsIsHelpError as exc:  # `melbo` or `melbo bench` alone: the help, as click shows it
        out.print(exc.format_message(), highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except UsageError as exc:  # a wrong option or value: one line naming the fix, like a MelboError
        where = exc.ctx.command_path if exc.ctx is not None else "melbo"
        _fail(f"{' '.join(exc.format_message().split())} (see '{where} --help')")
    except typer.Abort:
        err.print("melbo: aborted", highlight=False)
        sys.exit(130)
    except OSError as exc:  # the last line of defence: a path the checks did not foresee (too long, unreadable)
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}: check the path or the disk")
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]melbo: error:[/] {shown(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


# C0 and C1 control characters but newline and tab: an escape sequence in a label, note, path or completion could
# otherwise recolour, retitle or rewrite the user's terminal.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: object) -> str:
    """Text a user or a model wrote, safe to print through rich: controls as visible \\xNN, markup escaped."""
    return escape(_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))


def load(spec: Optional[str], device: str, dtype: str, blocks_path: Optional[str], threads: Optional[int] = None,
         system: Optional[str] = None):
    """Load a model for a command; `threads` (None = auto, see melbo.threads) sets torch's thread count first;
    `system` (--system-prompt) opens every conversation, refused in one line where the template has no room for it."""
    from melbo.engine.models import DEFAULT_MODEL, load_model
    from melbo.engine.prompts import check_system_role
    from melbo.threads import configure_threads

    configure_threads(threads)
    spec = spec or DEFAULT_MODEL
    with err.status(f"loading {spec} …"):
        lm = load_model(spec, device=device, dtype=dtype, blocks_path=blocks_path, system=system)
    if system is not None:
        check_system_role(lm)
    return lm


def recorded_system(given: Optional[str], model: object) -> Optional[str]:
    """--system-prompt, else the one the run or audit was made with (its model record, typed or as a dict)."""
    if given is not None:
        return given
    return model.get("system") if isinstance(model, dict) else getattr(model, "system", None)


def read_prompts(prompts: List[str], prompts_file: Optional[Path]) -> list[str]:
    from melbo.io.files import read_text

    found = list(prompts)
    if prompts_file is not None:
        found += [line for line in read_text(prompts_file, "prompts file").splitlines() if line.strip()]
    if not found:
        raise MelboError("no prompts given: pass prompts as arguments or with --prompts-file")
    return found


def parse_indices(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MelboError(f"--vectors {text!r} is not a comma-separated list of indices: use e.g. 2,5,9") from None


def parse_positions(text: str) -> Spec:
    """--positions as settings hold it, checked (melbo.positions)."""
    return Positions.parse(text).spec


def given(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among `names` given on the command line, as spelt there (`-n 16` counts, unlike a default)."""
    flags = {p.name: (p.opts[0] if p.opts else p.name) for p in ctx.command.params}
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return [flags[n] for n, source in sources.items() if source is not None and source.name != "DEFAULT"]


def interruptible(work: Callable, path: Path, command: str = "discover", *more: str):
    """Run `work`; on Ctrl-C, name the command that continues it (`more`: the arguments it needs beside --resume)."""
    import shlex

    try:
        return work()
    except KeyboardInterrupt:
        again = " ".join(shlex.quote(str(a)) for a in ("melbo", command, "--resume", path, *more))
        err.print(f"interrupted: finished batches are saved; continue with `{escape(again)}`", highlight=False)
        raise typer.Exit(130) from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
