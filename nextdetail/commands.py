"""The commands of `nextdetail`: what each does, its typed config, what its exit statuses mean.

Each command is a typed config (its options are derived from the config's fields by
nextdetail.options) run by `cli.cmd_<command>(cfg, args)`. Its --help shows the description
below, the options, and the exit statuses, worded once in nextdetail.errors.EXIT_STATUS; a
command whose inputs can partly fail says what its status 1 means (`partial`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from .errors import EXIT_STATUS


@dataclass(frozen=True)
class Command:
    help: str                       # one line, in `nextdetail --help`
    description: str                # the paragraph of `nextdetail COMMAND --help`
    config: str                     # "module:ConfigClass": its fields are the options
    partial: Optional[str] = None   # what exit status 1 means, for a command that may return it

    def config_class(self):
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)

    def exit_statuses(self) -> str:
        """The --help epilog: every status this command may return, with its meaning."""
        meanings = dict(EXIT_STATUS)
        if self.partial is None:
            del meanings[1]
        else:
            meanings[1] = self.partial
        return "exit status: " + "; ".join(f"{k} {v}" for k, v in meanings.items())


COMMANDS = {
    "decompose": Command(
        "split images into layers: the base-detail decomposition (bases, details, edges) or --method's",
        "Decompose each image I into I = B_n + D_n + ... + D_1 by repeated Ambrosio-Tortorelli smoothing "
        "and write the layers as .npy and .png plus a contact sheet, one folder per image under --out.",
        "nextdetail.decomp.files:DecomposeConfig",
        partial="some images could not be read or decomposed (the others are written)"),
    "decompose-dataset": Command(
        "decompose a whole dataset with Ray into a Zarr + Parquet store",
        "Decompose every image of SRC into STORE/bases.zarr (8-bit bases B_0..B_n in shards of many "
        "images; details are derived on read), STORE/manifest.parquet (one row per image) and "
        "STORE/meta.json, with a local Ray or a Ray cluster. Rerunning the same command resumes.",
        "nextdetail.pipelines.config:DecomposeDatasetConfig",
        partial="some images failed (the store is complete, the manifest has their error rows)"),
    "train-tokenizer": Command(
        "train a VQ-VAE tokenizer (BD, multi-scale or vanilla quantizer) on a store",
        "Train the tokenizer on a decomposition store with L2 + VQ/commitment + LPIPS + hinge GAN (from "
        "--disc-start; --disc patchgan or stylegan). RUN gets ckpt-<step>.pt every --ckpt-every steps and "
        "at the end, log.jsonl and loss.png. --resume continues from RUN's latest checkpoint exactly as "
        "an uninterrupted run.",
        "nextdetail.tokenize.train_config:TokenizerTrainConfig"),
    "eval-tokenizer": Command(
        "reconstruction quality: MSE/PSNR/LPIPS after each depth (CART Figure 11); PSNR, SSIM, LPIPS, rFID",
        "For each RUN (its latest checkpoint, or a checkpoint file), encode the first --images images of "
        "STORE (centre crops of the run's image size; use a held-out store) and decode the running sum of "
        "the first m token maps, m = 1..M. Writes OUT/eval.csv (run, quantizer, depth, map_side, mse, "
        "psnr, lpips), OUT/final.csv (the final depth: psnr, ssim, lpips, rfid) and OUT/eval.png (MSE "
        "against depth, one line per run), prints both tables. LPIPS and rFID need pretrained weights "
        "(cached, downloaded unless --offline, or --no-lpips / --no-rfid).",
        "nextdetail.tokenize.evaluate:EvalConfig"),
    "export-tokens": Command(
        "encode every ok image of a store into a token store (Ray)",
        "Encode every ok image of STORE (centre crop of the tokenizer's image size) with the tokenizer of "
        "RUN (its latest checkpoint, or a checkpoint file) into TOKENS/tokens.bin (uint16 (N, L), maps in "
        "generation order), TOKENS/index.parquet and TOKENS/meta.json (written last), with a local Ray or "
        "a Ray cluster. Rerunning the same command resumes from the finished blocks.",
        "nextdetail.pipelines.export_plan:ExportConfig",
        partial="some blocks were given up on after --max-attempts worker deaths (the rest is kept, the "
                "token store is not finished: rerun)"),
    "train": Command(
        "train the next-detail transformer on a token store",
        "Train the next-detail (CART) transformer on TOKENS (from export-tokens) with the quantizer of "
        "the tokenizer RUN they were exported with. RUN2 gets ckpt-<step>.pt, log.jsonl (per-map loss and "
        "accuracy) and loss.png; --resume continues exactly. Multi-GPU / multi-node: launch with "
        "torchrun.",
        "nextdetail.train.trainer:TransformerTrainConfig"),
    "export-model": Command(
        "a trained tokenizer or transformer as a model folder (safetensors, config.json, model card)",
        "Write RUN's latest checkpoint (a tokenizer run: its EMA weights when kept) as DIR/model.safetensors, "
        "DIR/config.json (everything needed to rebuild it, and the checkpoint it came from) and DIR/README.md "
        "(the model card: training data, steps, metrics), the layout huggingface_hub loads; a transformer's "
        "tokenizer goes to DIR/tokenizer/. Every command that takes a run also takes such a folder.",
        "nextdetail.export_model:ExportModelConfig"),
    "sample": Command(
        "generate images with a trained next-detail transformer",
        "Generate --n images of --class with RUN2's latest checkpoint (KV-cached, map by map: base maps, "
        "then detail maps; classifier-free guidance ramped linearly over the maps) and decode them with "
        "its tokenizer. Writes DIR/grid.png, DIR/sample_XXX.png (the base-only image, then after each "
        "detail factor; the last is the final image) and DIR/samples.json. --highres S generates at S "
        "times the trained resolution without retraining: upsampled base, detail maps patchwise (runs of the "
        "base-detail decomposition only). "
        "--per-class K draws K images of every class instead (each seeded on its own, in fixed batches "
        "split over torchrun's processes) into DIR/images/NNNNNN.png and resumable DIR/parts/, and with "
        "--npz FILE an ADM .npz batch for FID.",
        "nextdetail.generate.sample:SampleConfig"),
    "upscale": Command(
        "super-resolution by token prefix: the input's base maps, the details drawn by the model",
        "Each IMAGE (a centre crop of --input-size, default the tokenizer's size / --scale) is "
        "bicubic-resized to the tokenizer's size, decomposed and encoded; its first --prefix maps "
        "(default: the base maps) are kept and the model (the base-detail decomposition, the BD quantizer) "
        "draws the rest, unconditionally; "
        "above the training resolution the base is upsampled and the details drawn patchwise. Writes the "
        "result, the bicubic upscale and a sheet per image, DIR/upscale.json, and PSNR/SSIM against "
        "--reference (or, with --downscale-first, against each IMAGE itself).",
        "nextdetail.generate.upscale:UpscaleConfig"),
    "edit": Command(
        "recolor (intrinsic runs) or relight (specular runs) generated samples through their factors",
        "Draws --n samples and edits them without retraining: recolor keeps the shading maps and swaps or "
        "redraws the albedo maps (--to-class: under another class); relight keeps the diffuse base maps "
        "and scales (--gains), drops (gain 0) or redraws the specular terms. A strip per sample, "
        "DIR/edit_XXX.png (original, then each edit), and DIR/edit.json.",
        "nextdetail.generate.edit:EditConfig"),
    "eval-samples": Command(
        "FID, IS, KID and precision/recall of generated images against a reference",
        "Inception-v3 features (torch-fidelity's port of the TF graph ADM's evaluator uses) of SAMPLES "
        "and REF, each a folder of images, an ADM .npz batch (arr_0) or a decomposition store; REF may "
        "also be statistics (an .npz with mu and sigma: an ADM reference batch, or --save-stats output). "
        "Prints the metrics and writes them as JSON with the image counts and the weights' sha256. The "
        "weights: --inception-weights FILE, else the torch hub cache, else downloaded there unless "
        "--offline.",
        "nextdetail.evaluation.fidelity:EvalSamplesConfig"),
    "info": Command(
        "what a path is (store, token store, run, model folder, .npz) and its vital facts",
        "Say in a few lines what each PATH is: a decomposition store (images ok and error, method, order, "
        "size, AT parameters, shards, bytes per image, the first error rows), a token store (rows, tokens "
        "per row, its tokenizer's sha256, codebook usage per map), a tokenizer or transformer run (steps "
        "done, last losses, checkpoints), a model folder, an ADM .npz, or the output folder of sample, "
        "upscale, edit or eval-tokenizer. Reads only; a store another job is writing is described as it "
        "stands. --json prints one JSON object a line, for scripts.",
        "nextdetail.info:InfoConfig"),
    "view": Command(
        "a local web page over stores, token stores, runs and their outputs",
        "Serve a read-only web page (http://127.0.0.1 on a free port, printed) over each PATH: a decomposition "
        "store's paged thumbnail grid (filter by status, class, label; sort by AT energy) and each image's "
        "bases, details and manifest row; a token store's maps as pictures and codebook-usage histograms "
        "(decoded per depth with --tokenizer); a run's loss curves, samples and strips. It serves only "
        "what lies inside the PATHs, writes nothing and takes no lock. Stop it with Ctrl-C.",
        "nextdetail.view.config:ViewConfig"),
}
