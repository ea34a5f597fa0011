"""The `tinylm` command (also `python -m tinylm`): one subcommand per module, imported on use.

tinylm generate artifacts/runs/condor/checkpoints/best_model.pt --prompt "Once upon a time"
tinylm evaluate artifacts/runs/condor/checkpoints/best_model.pt data/processed/tinystories/bpe8192/test.bin
tinylm bench --models baseline --batch-sizes 64 512
tinylm verify data artifacts
tinylm check-config my.yaml
"""

from __future__ import annotations

import os
import sys

# name -> (module whose main(argv) runs it, one line for the command list)
COMMANDS = {
    "generate": ("tinylm.generate", "continue prompts with a trained model, streaming the text"),
    "evaluate": (
        "tinylm.evaluate_cli",
        "loss, perplexity and bits per byte of a checkpoint on a file",
    ),
    "bench": ("tinylm.bench", "time training steps and evaluation passes on this machine"),
    "verify": ("tinylm.verify", "re-hash artifacts against the sha256 their meta files record"),
    "check-config": ("tinylm.check_config", "check config files as the workflow reads them, naming any mistake"),
}
USAGE = "usage: tinylm [--help] [--version] COMMAND [ARGS]"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tinylm")
    except PackageNotFoundError:  # run from a checkout without `pip install`
        from . import __version__

        return __version__


def command_list() -> str:
    width = max(map(len, COMMANDS))
    return "commands:\n" + "\n".join(
        f"  {name:{width}}  {line}" for name, (_, line) in COMMANDS.items()
    )


def help_text() -> str:
    return (
        f"{USAGE}\n\nTiny GPT language models on TinyStories: the library behind the workflow.\n\n"
        f"{command_list()}\n\noptions:\n  -h, --help  show this message and exit\n"
        "  --version   print the version and exit\n\n"
        "'tinylm COMMAND --help' shows a command's arguments."
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else None
    if first in ("-h", "--help"):
        print(help_text())
        raise SystemExit(0)
    if first == "--version":
        print(f"tinylm {version()}")
        raise SystemExit(0)
    if first not in COMMANDS:
        what = "no command given" if first is None else f"unknown command '{first}'"
        print(f"{USAGE}\ntinylm: error: {what}\n\n{command_list()}", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    from .cli import ctrl_c_ends_quietly

    status = 0
    with ctrl_c_ends_quietly():  # one line, not a traceback through torch's frames (its import included)
        try:
            module = importlib.import_module(COMMANDS[first][0])
            try:
                status = module.main(argv[1:])
            except SystemExit as e:  # argparse's --help and usage errors
                status = e.code
            sys.stdout.flush()  # a reader that has gone shows here at the latest, not in Python's exit
        except BrokenPipeError:  # `tinylm ... | head`: the reader has what it wanted; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(status)


if __name__ == "__main__":
    main()
