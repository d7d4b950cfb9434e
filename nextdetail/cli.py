"""The `nextdetail` command. Each subcommand is a typed config (its options are derived from
the config's fields by nextdetail.options) and a `cmd_<command>(cfg, args)` that runs it;
errors are reported once, in `main`, as one line and the error's exit status.

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

Exit status: 0 done; 1 some inputs failed and the rest is done (error rows in a store, images
that `decompose` could not read, token blocks given up on); 2 usage or input error (an option,
a file, a store, a checkpoint); 3 the job did not finish (Ray, I/O, a diverged loss): rerunning
the same command resumes; 130 interrupted, 143 stopped by SIGTERM (preempted; rerunning resumes).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from typing import Optional, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .errors import NextDetailError
from .faults import PREEMPTED_STATUS, Preempted, cause_line, terminable
from .options import add_options, build

PROG = "nextdetail"

# name: (help, description, "module:Config"); the options come from the config's fields.
COMMANDS = {
    "decompose": (
        "split images into base/detail/edge layers (CART base-detail)",
        "Decompose each image I into I = B_n + D_n + ... + D_1 by repeated Ambrosio-Tortorelli "
        "smoothing and write the layers as .npy and .png plus a contact sheet, one folder per "
        "image under --out. Exit status: 0 done, 1 some images failed, 2 usage.",
        "nextdetail.decomp.files:DecomposeConfig"),
    "decompose-dataset": (
        "decompose a whole dataset with Ray into a Zarr + Parquet store",
        "Decompose every image of SRC into STORE/bases.zarr (8-bit bases B_0..B_n in shards of many "
        "images; details are derived on read), "
        "STORE/manifest.parquet (one row per image) and STORE/meta.json, with a local Ray or a Ray "
        "cluster. Rerunning the same command resumes. Exit status: 0 every image ok, 1 some images "
        "failed (the store is complete, see the manifest), 2 usage, parameter or store mismatch, "
        "3 the job did not finish (rerun to resume), 130 interrupted (rerun to resume).",
        "nextdetail.pipelines.config:JobConfig"),
    "train-tokenizer": (
        "train a VQ-VAE tokenizer (base-detail, multi-scale or vanilla) on a store",
        "Train the tokenizer on a decomposition store with L2 + VQ/commitment + LPIPS + hinge "
        "PatchGAN (from --disc-start). RUN gets ckpt-<step>.pt every --ckpt-every steps and at the "
        "end, log.jsonl and loss.png. --resume continues from RUN's latest checkpoint exactly as an "
        "uninterrupted run. Exit status: 0 trained, 2 usage, parameter, store or run-folder error, "
        "3 training failed.",
        "nextdetail.tokenize.train:TokenizerTrainConfig"),
    "eval-tokenizer": (
        "reconstruction quality: MSE/PSNR/LPIPS after each depth (CART Figure 11); PSNR, SSIM, LPIPS, rFID",
        "For each RUN (its latest checkpoint, or a checkpoint file), encode the first --images "
        "images of STORE (centre crops of the run's image size; use a held-out store) and decode the "
        "running sum of the first m token maps, m = 1..M. Writes OUT/eval.csv (run, quantizer, depth, "
        "map_side, mse, psnr, lpips), OUT/final.csv (the final depth: psnr, ssim, lpips, rfid) and "
        "OUT/eval.png (MSE against depth, one line per run), prints both tables. LPIPS and rFID need "
        "pretrained weights (cached, downloaded unless --offline, or --no-lpips / --no-rfid). Exit "
        "status: 0 done, 2 usage, store, checkpoint or missing weights.",
        "nextdetail.tokenize.evaluate:EvalConfig"),
    "export-tokens": (
        "encode every ok image of a store into a token store (Ray)",
        "Encode every ok image of STORE (centre crop of the tokenizer's image size) with the "
        "tokenizer of RUN (its latest checkpoint, or a checkpoint file) into TOKENS/tokens.bin "
        "(uint16 (N, L), maps in generation order), TOKENS/index.parquet and TOKENS/meta.json "
        "(written last), with a local Ray or a Ray cluster. Rerunning the same command resumes from "
        "the finished blocks. Exit status: 0 done, 1 some blocks were given up on after "
        "--max-attempts worker deaths (the rest is kept, the token store is not finished; rerun), "
        "2 usage, store or checkpoint error, 3 the export did not finish (rerun to resume), 130 "
        "interrupted (rerun to resume).",
        "nextdetail.pipelines.export:ExportConfig"),
    "train": (
        "train the next-detail transformer on a token store",
        "Train the next-detail (CART) transformer on TOKENS (from export-tokens) with the quantizer "
        "of the tokenizer RUN they were exported with. RUN2 gets ckpt-<step>.pt, log.jsonl (per-map "
        "loss and accuracy) and loss.png; --resume continues exactly. Multi-GPU / multi-node: "
        "launch with torchrun. Exit status: 0 trained, 2 usage, parameter, token store or "
        "run-folder error, 3 training failed.",
        "nextdetail.train.trainer:TransformerTrainConfig"),
    "sample": (
        "generate images with a trained next-detail transformer",
        "Generate --n images of --class with RUN2's latest checkpoint (KV-cached, map by map: base "
        "maps, then detail maps; classifier-free guidance ramped linearly over the maps) and decode "
        "them with its tokenizer. Writes DIR/grid.png, DIR/sample_XXX.png (the base-only image, "
        "then after each detail factor; the last is the final image) and DIR/samples.json. "
        "--highres S generates at S times the trained resolution without retraining: upsampled "
        "base, detail maps patchwise. --per-class K draws K images of every class instead (each seeded "
        "on its own, in fixed batches split over torchrun's processes) into DIR/images/NNNNNN.png and "
        "resumable DIR/parts/, and with --npz FILE an ADM .npz batch for FID. Exit status: 0 done, "
        "2 usage, run or tokenizer error.",
        "nextdetail.generate.sample:SampleConfig"),
    "upscale": (
        "super-resolution by token prefix: the input's base maps, the details drawn by the model",
        "Each IMAGE (a centre crop of --input-size, default the tokenizer's size / --scale) is "
        "bicubic-resized to the tokenizer's size, decomposed and encoded; its first --prefix maps "
        "(default: the base maps) are kept and the base-detail model draws the rest, unconditionally; "
        "above the training resolution the base is upsampled and the details drawn patchwise. Writes "
        "the result, the bicubic upscale and a sheet per image, DIR/upscale.json, and PSNR/SSIM "
        "against --reference (or, with --downscale-first, against each IMAGE itself). Exit status: 0 "
        "done, 2 usage, run, image or model error.",
        "nextdetail.generate.upscale:UpscaleConfig"),
    "edit": (
        "recolor (intrinsic runs) or relight (specular runs) generated samples through their factors",
        "Draws --n samples and edits them without retraining: recolor keeps the shading maps and "
        "swaps or redraws the albedo maps (--to-class: under another class); relight keeps the diffuse "
        "base maps and scales (--gains), drops (gain 0) or redraws the specular terms. A strip per "
        "sample, DIR/edit_XXX.png (original, then each edit), and DIR/edit.json. Exit status: 0 done, "
        "2 usage, or a run whose decomposition has no such factors.",
        "nextdetail.generate.edit:EditConfig"),
    "eval-samples": (
        "FID, IS, KID and precision/recall of generated images against a reference",
        "Inception-v3 features (torch-fidelity's port of the TF graph ADM's evaluator uses) of SAMPLES "
        "and REF, each a folder of images, an ADM .npz batch (arr_0) or a decomposition store; REF may "
        "also be statistics (an .npz with mu and sigma: an ADM reference batch, or --save-stats output). "
        "Prints the metrics and writes them as JSON with the image counts and the weights' sha256. The "
        "weights: --inception-weights FILE, else the torch hub cache, else downloaded there unless "
        "--offline. Exit status: 0 done, 2 usage, input or missing weights.",
        "nextdetail.evaluation.fidelity:EvalSamplesConfig"),
}
RESUMABLE = ("train-tokenizer", "train")          # these take --resume besides their config


def config_class(command: str):
    module, name = COMMANDS[command][2].split(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- the commands

def cmd_decompose(cfg, args) -> int:
    from .decomp.files import decompose_files

    report = decompose_files(cfg, on_failure=lambda msg: tqdm.write(msg, file=sys.stderr))
    print(report.summary(cfg.out))
    return 1 if report.failures else 0


def cmd_decompose_dataset(cfg, args) -> int:
    from .pipelines import run_job
    from .progress import JobProgress

    report = run_ray_command(args, lambda: run_job(cfg, JobProgress("decompose-dataset", "already in the store")))
    for line in report.failed_shards:          # shards that could not be opened: their images are not counted
        print(f"{line} (shard not read)", file=sys.stderr)
    print(report.summary())
    return 0 if report.error == 0 and not report.failed_shards else 1


def cmd_export_tokens(cfg, args) -> int:
    from .pipelines.export import run_export
    from .progress import JobProgress

    report = run_ray_command(args, lambda: run_export(cfg, JobProgress("export-tokens", "already exported")))
    print(report.summary())
    return 1 if report.failed else 0


def run_ray_command(args, run):
    """A Ray job with Ray Data's console quiet (unless -v)."""
    from .progress import quiet_ray_data

    if not args.verbose:
        quiet_ray_data()
    return run()


def _training(name: str, train, cfg, args, postfix) -> int:
    """Both trainers' commands: a step bar and the summary line, from rank 0 alone under torchrun."""
    from .progress import step_bar

    rank0 = int(os.environ.get("RANK", "0")) == 0
    bar, progress = step_bar(name, cfg.steps, postfix, rank0)
    try:
        with logging_redirect_tqdm():
            report = train(cfg, resume=args.resume, progress=progress)
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
    from .progress import JobProgress
    from .generate.batches import sample_per_class

    rank0 = int(os.environ.get("RANK", "0")) == 0
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, description, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        if name == command:
            add_options(p, config_class(name))
            if name in RESUMABLE:
                p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
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
            cfg = build(config_class(args.command), args)
            return globals()[f"cmd_{args.command.replace('-', '_')}"](cfg, args)
        except NextDetailError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return e.exit_status
        except OSError as e:                # I/O on the driver's side: the run did not finish
            print(f"{name}: error: {cause_line(e)}", file=sys.stderr)
            return 3
        except FloatingPointError as e:     # a diverged loss
            print(f"{name}: error: {e}", file=sys.stderr)
            return 3
        except Preempted:
            print(f"{name}: stopped by SIGTERM; rerun the same command to resume", file=sys.stderr)
            return PREEMPTED_STATUS
        except KeyboardInterrupt:
            print(f"{name}: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
