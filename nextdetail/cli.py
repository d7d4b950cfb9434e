"""The `nextdetail` command. Each subcommand is a typed config (nextdetail.commands: its options
are derived from the config's fields by nextdetail.options) and a `cmd_<command>(cfg, args)`
here that runs it; errors are reported once, in `main`, as one line and the error's exit status.

    nextdetail decompose INPUT... --out DIR [--order 3 --alpha 10 ... --backend auto --size N]
    nextdetail decompose-dataset SRC --out STORE [--size 256 --order 3 ... --workers N]
    nextdetail train-tokenizer --data STORE --out RUN [--quantizer basedetail --image-size 256 ...]
    nextdetail eval-tokenizer RUN... --data STORE [--out DIR --images N --no-lpips --no-rfid]
    nextdetail export-tokens --data STORE --tokenizer RUN --out TOKENS [--workers N --shard-rows R]
    nextdetail train --tokens TOKENS --tokenizer RUN --out RUN2 [--depth --width ... --resume]
    nextdetail sample RUN2 --out DIR [--class C --n 16 --cfg 1.5 --top-k --top-p --seed S --highres 2]
    nextdetail sample RUN2 --out DIR --per-class 50 [--npz FILE --no-png --batch-size B]   (torchrun-aware)
    nextdetail upscale IMAGE... --run RUN2 --out DIR [--scale 4 --prefix K --overlap --reference REF...]
    nextdetail edit RUN2 --out DIR --edit recolor|relight [--n 4 --variants 2 --gains 0,0.5,2]
    nextdetail eval-samples SAMPLES [--ref REF --inception-weights FILE --save-stats FILE --offline]
    nextdetail info PATH... [--json]
    nextdetail view PATH... [--host 127.0.0.1 --port 0 --tokenizer RUN]

Exit statuses: nextdetail.errors.EXIT_STATUS, shown by every command's --help.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .commands import COMMANDS
from .errors import INTERRUPTED, JOB_FAILED, PARTIAL, PREEMPTED, NextDetailError
from .faults import Preempted, cause_line, terminable
from .options import add_options, build
from .storage import is_url, set_storage_options, storage_error

PROG = "nextdetail"

# --------------------------------------------------------------------------- the commands

def cmd_decompose(cfg, args) -> int:
    from .decomp.files import decompose_files

    report = decompose_files(cfg, on_failure=lambda msg: tqdm.write(msg, file=sys.stderr))
    print(report.summary(cfg.out))
    return PARTIAL if report.failures else 0


def cmd_decompose_dataset(cfg, args) -> int:
    from .pipelines import run_job
    from .progress import JobProgress

    report = run_ray_command(args, lambda: run_job(cfg, JobProgress("decompose-dataset", "already in the store")))
    for line in report.failed_shards:          # shards that could not be opened: their images are not counted
        print(f"{line} (shard not read)", file=sys.stderr)
    print(report.summary())
    return 0 if report.error == 0 and not report.failed_shards else PARTIAL


def cmd_export_tokens(cfg, args) -> int:
    from .pipelines.export import run_export
    from .progress import JobProgress

    report = run_ray_command(args, lambda: run_export(cfg, JobProgress("export-tokens", "already exported")))
    print(report.summary())
    return PARTIAL if report.failed else 0


def run_ray_command(args, run):
    """A Ray job with Ray Data's console quiet (unless -v)."""
    from .progress import quiet_ray_data

    if not args.verbose:
        quiet_ray_data()
    return run()


def _training(name: str, train, cfg, args, postfix) -> int:
    """Both trainers' commands: a step bar and the summary line, from rank 0 alone under torchrun."""
    from .distributed import main_process
    from .progress import step_bar

    rank0 = main_process()
    bar, progress = step_bar(name, cfg.steps, postfix, rank0)
    try:
        with logging_redirect_tqdm():
            report = train(cfg, progress=progress)
    finally:
        bar.close()
    if rank0:
        print(report.summary())
    return 0


def cmd_train_tokenizer(cfg, args) -> int:
    from .tokenize.train import train

    return _training("train-tokenizer", train, cfg, args,
                     lambda rec: {"loss": f"{rec['loss']:.4f}", "l2": f"{rec['l2']:.4f}"})


def cmd_eval_tokenizer(cfg, args) -> int:
    from .tokenize.evaluate import evaluate, table, write_results

    rows, finals = evaluate(cfg)
    files = write_results(rows, finals, cfg.out)
    print(table(rows, finals))
    print(f"{len(cfg.runs)} runs on {rows[0].images} images; wrote {files['csv']}, {files['final']} and "
          f"{files['png']}")
    return 0


def cmd_train(cfg, args) -> int:
    from .train.trainer import train

    return _training("train", train, cfg, args, lambda rec: {"loss": f"{rec['loss']:.4f}",
                                                            "tok_s": f"{rec['tokens_per_s']:,.0f}"})


def cmd_export_model(cfg, args) -> int:
    from .export_model import export_model

    print(export_model(cfg).summary())
    return 0


def cmd_sample(cfg, args) -> int:
    from .generate.run import class_label, load_run
    from .generate.sample import sample_to_folder

    if cfg.per_class:
        return _sample_per_class(cfg)
    run = load_run(cfg.run, tokenizer=cfg.tokenizer, device=cfg.device)
    label = class_label(cfg.label, run.meta["class_names"])
    bar = tqdm(total=cfg.n, unit="img", desc="sample", file=sys.stderr, disable=None)
    try:
        report = sample_to_folder(run, cfg.out, cfg, label=label, progress=bar.update)
    finally:
        bar.close()
    print(report.summary())
    return 0


def _sample_per_class(cfg) -> int:
    """`sample --per-class K`: the evaluation batch, split over torchrun's processes; rank 0 shows
    the bar (its own share of the batches) and prints the summary."""
    from .distributed import main_process
    from .generate.batches import sample_per_class
    from .progress import JobProgress

    rank0 = main_process()
    progress = JobProgress("sample", "already sampled") if rank0 else None
    try:
        with logging_redirect_tqdm():
            report = sample_per_class(cfg, progress)
    finally:
        if progress is not None:
            progress.close()
    if rank0:
        print(report.summary())
    return 0


def cmd_upscale(cfg, args) -> int:
    from .generate.upscale import upscale_files

    bar = tqdm(total=len(cfg.images), unit="img", desc="upscale", file=sys.stderr, disable=None)
    try:
        report = upscale_files(cfg, progress=bar.update)
    finally:
        bar.close()
    print(report.summary())
    return 0


def cmd_edit(cfg, args) -> int:
    from .generate.edit import edit_to_folder

    print(edit_to_folder(cfg).summary())
    return 0


def cmd_eval_samples(cfg, args) -> int:
    from .evaluation.fidelity import evaluate_samples

    bar = tqdm(unit="img", desc="inception", file=sys.stderr, disable=None)
    try:
        report = evaluate_samples(cfg, progress=bar.update)
    finally:
        bar.close()
    print(report.table())
    print(report.summary())
    return 0


def cmd_info(cfg, args) -> int:
    import json

    from .info import inspect

    infos = [inspect(p) for p in cfg.paths]         # every PATH is checked before anything is printed
    for info in infos:
        print(json.dumps(info.to_json()) if cfg.json else "\n".join(info.lines()))
    return 0


def cmd_view(cfg, args) -> int:
    from .view.serve import serve

    return serve(cfg)


# --------------------------------------------------------------------------- entry point

class UsageError(NextDetailError):
    """What argparse refuses (an unknown option, a missing argument, a bad number): one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "nextdetail train: error: --lr must be a finite number > 0,
    got nan (nextdetail train --help lists the options)", exit status 2, raised rather than exited
    so that main reports it like every other error."""

    def error(self, message):
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[-1] + " ", message)
        raise UsageError(f"{message} ({self.prog} --help lists the options)")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; options are added for `command` only (importing a config may import torch,
    which `decompose` and `--help` should not pay for)."""
    parser = _Parser(prog=PROG, description="Data pipelines for next-detail (CART) "
                                                            "autoregressive image generation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    parser.add_argument("--storage-options", metavar="JSON", default=None,
                        help="fsspec storage options for every path that is a URL (s3://, gs://, ...), a JSON "
                             "object; credentials and endpoints come from the back-end's own environment "
                             "variables and files (AWS_ENDPOINT_URL, ~/.aws, ...) without it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help, description=c.description, epilog=c.exit_statuses())
        if name == command:
            add_options(p, c.config_class())
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point. Returns the exit status (see the module docstring); every error,
    argparse's included, is one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    name = f"{PROG} {command}" if command else PROG
    with terminable():
        try:
            args = build_parser(command).parse_args(argv)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                                format="%(name)s: %(levelname)s: %(message)s")
            set_storage_options(args.storage_options)
            cfg = build(COMMANDS[args.command].config_class(), args)
            try:
                return globals()[f"cmd_{args.command.replace('-', '_')}"](cfg, args)
            except Exception as e:        # object storage unreachable or refusing us: say which, once
                failure = storage_error(e, [v for v in vars(cfg).values() if is_url(v)])
                if failure is None:
                    raise
                raise failure from e
        except NextDetailError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return e.exit_status
        except OSError as e:                # I/O on the driver's side: the run did not finish
            print(f"{name}: error: {cause_line(e)}", file=sys.stderr)
            return JOB_FAILED
        except FloatingPointError as e:     # a diverged loss
            print(f"{name}: error: {e}", file=sys.stderr)
            return JOB_FAILED
        except Preempted:
            print(f"{name}: stopped by SIGTERM; rerun the same command to resume", file=sys.stderr)
            return PREEMPTED
        except KeyboardInterrupt:
            print(f"{name}: interrupted; rerun the same command to resume", file=sys.stderr)
            return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
