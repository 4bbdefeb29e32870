"""The `r1kit` command: parse, load the command's config, call one function."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys

from rich.console import Console
from rich.table import Table

from r1kit import __version__
from r1kit.config import (
    ChatConfig,
    ConfigError,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    PipelineConfig,
    SampleConfig,
    ServeConfig,
    SFTConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
)

EPILOG = """examples:
  r1kit demo                                    GRPO on addition with the embedded model, held-out before and after
  r1kit eval --task gsm8k --data gsm8k_test.jsonl --samples 4 --limit 200
  r1kit eval --task arithmetic task_args.digits=3 --temperature 0
  r1kit train --config examples/train_addition.yaml steps=50
  r1kit report runs/train
  r1kit sample --teacher solutions --task gsm8k --data gsm8k_train.jsonl --out runs/cold_start.jsonl
  r1kit sample --teacher-url http://127.0.0.1:8000/v1 --teacher-model reasoner --task gsm8k --data gsm8k_train.jsonl
  r1kit pipeline --config examples/r1_gsm8k.yaml
  r1kit distill --teacher runs/teacher/final --student default --task countdown
  r1kit sft --data traces.jsonl --model default --epochs 2 out=runs/sft
  r1kit serve --model runs/train/checkpoints/step-100 --api-key secret
  r1kit chat --url http://127.0.0.1:8000 --api-key secret
  r1kit tasks show countdown
  r1kit models info default
"""


# the commands that split their work over torchrun's processes (sample: a local teacher's; pipeline, distill: their
# stages')
DATA_PARALLEL = ("train", "sft", "eval", "sample", "pipeline", "distill")
INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (it saved what it had)

# command, config, what it runs ("module:function" taking the config), help, description
CONFIG_COMMANDS = [
    ("eval", EvalConfig, "r1kit.eval.harness:run_eval", "evaluate a model: pass@1 over k samples, cons@k, pass@k",
     "Sample k completions per problem (T=0.6, top-p 0.95 as in the R1 paper), verify each, and write "
     "results.json, samples.jsonl and summary.md to --out."),
    ("train", TrainConfig, "r1kit.rl.run:run_train", "GRPO with rule-based rewards (R1-Zero from a base model)",
     "Group Relative Policy Optimization: G completions per prompt, rewards from verifiers, group-relative "
     "advantages, the clipped objective. Ctrl-C or SIGTERM saves a checkpoint; resume=latest continues exactly. Writes "
     "config.yaml, run.json, metrics.jsonl, samples.jsonl, TensorBoard events, checkpoints/ and final/ to --out; "
     "without resume, an earlier run there is moved aside to OUT.old-<time> first."),
    ("sft", SFTConfig, "r1kit.sft.run:run_sft", "supervised fine-tuning on reasoning traces (cold start, distillation)",
     "Fine-tune on JSONL traces, either chat `messages` or `prompt` + `reasoning` + `answer` (the prompt built with "
     "--template, as evaluation builds it; the completion `<think>\\n{reasoning}\\n</think>\\n{answer}`). The loss "
     "is on assistant tokens only; examples are packed into rows of --micro-batch-tokens without padding (each "
     "attends only to itself); LoRA with --lora-r. Held-out rows give an eval loss. Ctrl-C or SIGTERM saves a "
     "checkpoint; resume=latest continues exactly. Writes metrics.jsonl, TensorBoard events, checkpoints/, "
     "report/ and final/ (the trained model, LoRA merged); without resume, an earlier run there is moved aside to "
     "OUT.old-<time> first."),
    ("sample", SampleConfig, "r1kit.sample.run:run_sample",
     "rejection sampling: a teacher's verified, filtered traces as SFT data",
     "For each prompt of a task, N traces from a teacher: a model r1kit loads (--teacher), an OpenAI-compatible "
     "endpoint (--teacher-url, --teacher-model: a hosted R1, vLLM, Ollama or r1kit serve), or the rows' own worked "
     "solutions (--teacher solutions: a cold start without a model, e.g. GSM8K's training set). A trace is kept when "
     "the task's verifier accepts it and it passes the filters (format, language consistency, length, no repetition "
     "loop, no duplicate: filters.<name>=value). Kept rows (prompt, reasoning, answer, with the teacher's identity, "
     "the sampling settings and the reward) go to --out, which `r1kit sft --data` reads. A killed run, started "
     "again with the same settings, continues after its last finished round. Lengths are counted with the teacher's "
     "tokenizer, or the embedded model's for an endpoint or solutions."),
    ("pipeline", PipelineConfig, "r1kit.pipeline.run:run_pipeline",
     "the R1 recipe as stages: cold start, RL, rejection sampling, SFT, final RL",
     "Run the stages of --config (YAML) in order, each a sample, sft or train command whose output is the next "
     "stage's input (settings left out come from the pipeline and earlier stages; @name is a stage's output, @base "
     "the base model). The base model and every model a stage makes are evaluated with the `eval` settings. A "
     "finished stage is skipped when the pipeline runs again, unless its resolved config or its inputs' sha256 "
     "changed; an interrupted one resumes. Writes a folder per stage and report/ (a table and curves of all of "
     "them). See examples/r1_gsm8k.yaml."),
    ("distill", DistillConfig, "r1kit.distill:run_distill",
     "a teacher's verified traces into a student: sample, SFT, evaluate before and after",
     "Rejection-sample traces from --teacher (a model, an endpoint with --teacher-url, or 'solutions'), fine-tune "
     "--student on them, and evaluate the student before and after with the `eval` settings: a two-stage pipeline "
     "(rerunning it skips what is done). sample.*, sft.* and eval.* pass settings to each step."),
    ("serve", ServeConfig, "r1kit.serve.server:run_serve",
     "OpenAI-compatible API with the reasoning trace, and a web chat page",
     "Serve a model: POST /v1/chat/completions (reasoning in reasoning_content), /v1/completions, GET /v1/models "
     "(with weight sha256), /health, and a chat page at /. Several models, a router and a gate: --config serve.yaml. "
     "On a GPU each model's engine runs in a process of its own and warms up (CUDA graphs, compiles: about a "
     "minute on a fresh machine) before the server listens; every 10 s while it generates, the log says the "
     "engine's tokens/s and step times."),
    ("chat", ChatConfig, "r1kit.serve.chat:run_chat", "terminal chat with a model (--model) or a server (--url)",
     "Chat in the terminal: replies stream in, the reasoning dimmed."),
    ("demo", DemoConfig, "r1kit.demo:run_demo", "the main job: GRPO on addition, held-out accuracy before and after",
     "Measure the embedded model's accuracy on held-out addition problems, train it with GRPO on others for "
     "--time-budget-s seconds (420 on a GPU, 240 on a CPU; as many steps as fit at the speed of the first), measure "
     "again, write a report. The evaluations add to that time: minutes on a CPU. An earlier run in --out is moved "
     "aside to OUT.old-<time>."),
]


def cmd_config(args: argparse.Namespace) -> int:
    """Run a config command; 130 when it was interrupted (Ctrl-C) and saved what it had."""
    module, function = args.target.split(":")
    result = getattr(importlib.import_module(module), function)(config_from_args(args.config_cls, args))
    return INTERRUPTED if isinstance(result, dict) and result.get("interrupted") else 0


def cmd_report(args: argparse.Namespace) -> None:
    from r1kit.eval.report import write_training_report

    print(f"wrote {write_training_report(args.run_dir)}")


def cmd_models_info(args: argparse.Namespace) -> None:
    from r1kit.models import model_info

    info = model_info(args.spec)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


def cmd_models_import(args: argparse.Namespace) -> None:
    from r1kit.models import import_gguf, weights_sha256

    out = import_gguf(args.gguf, args.out_dir)
    print(f"imported {args.gguf} -> {out} (weights sha256 {weights_sha256(out)})")


def cmd_tasks_list(args: argparse.Namespace) -> None:
    from r1kit.tasks import TASKS, task_options

    table = Table("task", "options", "what it is")
    for name, build in TASKS.items():
        opts = ", ".join(f"{k}={v}" for k, v in task_options(name).items())
        table.add_row(name, opts, (build.__doc__ or "").strip().splitlines()[0])
    Console().print(table)


def cmd_tasks_show(args: argparse.Namespace) -> None:
    from r1kit.config import parse_overrides
    from r1kit.tasks import TASKS, load_task, task_options

    options = parse_overrides(args.overrides)
    nested = options.pop("task_args", {})  # task_args.key=value, as train and eval take them, works here too
    if not isinstance(nested, dict):
        raise ConfigError("task_args takes task_args.<option>=value")
    options.update(nested)
    data = options.pop("data", args.data)  # data=PATH as well as --data
    task = load_task(args.name, data, **options)
    given = {**options, **({"data": data} if data is not None else {})}
    console = Console()
    console.print(f"[bold]{args.name}[/bold]: {(TASKS[args.name].__doc__ or '').strip()}")
    console.print("options: " + ", ".join(f"{k}={given.get(k, v)}" for k, v in task_options(args.name).items()))
    console.print(f"rows: {len(task)}")
    for row in task.rows[: args.rows]:
        shown = {k: v for k, v in row.items() if not k.startswith("_")}
        console.print_json(json.dumps(shown, ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every subcommand with its own --help."""
    parser = argparse.ArgumentParser(
        prog="r1kit", description="The DeepSeek-R1 recipe on your own hardware and your own verifiable tasks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"r1kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, config_cls, target, help_, description in CONFIG_COMMANDS:
        p = sub.add_parser(name, help=help_, description=description)
        add_config_arguments(p, config_cls)
        if name in DATA_PARALLEL:
            p.add_argument("--nproc", type=int, metavar="N",
                           help="run on N processes of this machine, one GPU each (torchrun --standalone)")
        p.set_defaults(func=cmd_config, config_cls=config_cls, target=target, command_parser=p)

    p = sub.add_parser("report", help="plots and sample pages of a training run")
    p.add_argument("run_dir", help="the run folder (the `out` of r1kit train)")
    p.set_defaults(func=cmd_report, command_parser=p)

    models = sub.add_parser("models", help="import GGUF files, show model identity").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("info", help="architecture, parameters, dtype and weight sha256 of a model")
    p.add_argument("spec", help="'default', a .gguf file or a local HF folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_info, command_parser=p)
    p = models.add_parser("import", help="dequantize a GGUF file into a trainable HF checkpoint")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out_dir", help="folder to write the HF checkpoint to")
    p.set_defaults(func=cmd_models_import, command_parser=p)

    tasks = sub.add_parser("tasks", help="list the built-in tasks, show one").add_subparsers(
        dest="tasks_command", required=True, metavar="ACTION")
    p = tasks.add_parser("list", help="every built-in task with its options")
    p.set_defaults(func=cmd_tasks_list, command_parser=p)
    p = tasks.add_parser("show", help="a task's description, options and first rows")
    p.add_argument("name", help="task name")
    p.add_argument("--data", help="JSONL file for data-backed tasks")
    p.add_argument("--rows", type=int, default=3, help="rows to print (default: 3)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="task options, e.g. digits=3 (or task_args.digits=3, as train and eval take them)")
    p.set_defaults(func=cmd_tasks_show, command_parser=p)
    return parser


def unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """The message for arguments a command does not take, with the closest flag for a mistyped one."""
    flags = [f for action in parser._actions for f in action.option_strings]
    hints = [f"{a} (did you mean {close[0]}?)"
             if a.startswith("-") and (close := difflib.get_close_matches(a.split("=")[0], flags, n=1)) else a
             for a in extra]
    return f"unrecognized arguments: {' '.join(hints)}"


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """The command line that runs the r1kit arguments argv, --nproc left out, under torchrun on nproc processes."""
    kept = [a for i, a in enumerate(argv)
            if a != "--nproc" and not a.startswith("--nproc=") and (i == 0 or argv[i - 1] != "--nproc")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "r1kit.cli", *kept]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `r1kit` command; expected errors print one line and exit 2."""
    from transformers.utils import logging as hf_logging

    from r1kit.models import ModelError
    from r1kit.tasks import DataError

    hf_logging.disable_progress_bar()  # r1kit shows its own progress; HF's bars only interleave with it
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags too, which argparse alone does not allow
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        args.command_parser.error(unrecognized(args.command_parser, stray or extra))  # with the command's usage
    if extra:
        args.overrides = [*args.overrides, *extra]
    # torchrun takes this process's place; its own processes (LOCAL_RANK set) run the command
    if (getattr(args, "nproc", None) or 1) > 1 and "LOCAL_RANK" not in os.environ:
        command = torchrun_argv(sys.argv[1:] if argv is None else argv, args.nproc)
        sys.stdout.flush()
        os.execv(command[0], command)
    try:
        code = args.func(args)
    except (ConfigError, ModelError, DataError, ValueError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
