"""`python -m marl_llm COMMAND [args]` — one entry point for every command (`COMMAND --help` for each)."""
from __future__ import annotations

import sys

# command -> (module with a main(argv), what it does)
COMMANDS = {
    "train": ("marl_llm.train", "train a run: python -m marl_llm train experiment=smoke"),
    "evaluate": ("marl_llm.evaluate", "score a run's checkpoint on held-out tasks (baseline=init: vs the initial model)"),
    "report": ("marl_llm.report", "figures and an HTML page of one or more runs"),
    "compare": ("marl_llm.eval_store", "pair two runs' evaluations task by task: A - B with 95% intervals"),
    "envcheck": ("marl_llm.envcheck", "check a dataset against an env: columns, prompts, reference answers scored"),
    "preflight": ("marl_llm.preflight", "the GPU plan of a run: each actor's GPUs and each GPU's memory (starts nothing)"),
    "list": ("marl_llm.catalog", "algorithms, envs (with their dataset columns), model presets, experiments"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return ("usage: python -m marl_llm COMMAND [args]   (or marl-llm-train, marl-llm-evaluate, marl-llm-report)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n`python -m marl_llm COMMAND --help` describes each command and "
            "its keys; the Python API is `from marl_llm import train, evaluate, compose, RunConfig`.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from marl_llm import __version__
        print(f"marl_llm {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {list(COMMANDS)} (python -m marl_llm --help)",
              file=sys.stderr)
        return 2
    import importlib

    module, _ = COMMANDS[argv[0]]
    sys.argv = [f"marl_llm {argv[0]}", *argv[1:]]  # Hydra (train) reads sys.argv itself
    status = importlib.import_module(module).main(argv[1:])
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
