"""Command line: python -m tinylm {generate,bench,verify} ...

    python -m tinylm generate artifacts/runs/condor/checkpoints/best_model.pt --prompt "Once upon a time"
    python -m tinylm bench --models baseline --batch-sizes 64 512
    python -m tinylm verify data artifacts
"""

from __future__ import annotations

import sys

COMMANDS = {
    "generate": ("tinylm.generate", "stream a model's continuation of prompts"),
    "bench": ("tinylm.bench", "time training steps and evaluation passes"),
    "verify": ("tinylm.verify", "re-hash artifacts against their recorded sha256"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:10s} {help}" for name, (_, help) in COMMANDS.items())
        print(f"usage: python -m tinylm COMMAND [ARGS]\n\ncommands:\n{lines}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    raise SystemExit(module.main(argv[1:]))


if __name__ == "__main__":
    main()
