"""`make demo`: decompose a few photographs and point at the contact sheets.

    python -m nextdetail.demo --out DIR [--images PATH...] [--size 256]

Without --images it uses photographs that ship inside the scikit-image wheel (no
download): they are written to DIR/inputs/*.png and decomposed like any other input. The
work is done by `nextdetail decompose` itself (nextdetail.cli.main), so the demo exercises
exactly the command users run. Then `nextdetail decompose-dataset` (a local Ray) puts the
same images into the store DIR/dataset-store, and the demo renders the first image read
back from it as DIR/dataset-store-contact.png.

Then the whole generation chain on the same photos, small (64 px) so that it runs in a few
minutes on a 2-core CPU, each step a `nextdetail` command printing where its output is
(`--no-chain` skips it):

    decompose-dataset LIST --out DIR/chain/store --size 64
    train-tokenizer --data DIR/chain/store --out DIR/chain/tokenizer --image-size 64 --downsample 8 ...
    export-tokens --data DIR/chain/store --tokenizer DIR/chain/tokenizer --out DIR/chain/tokens
    train --tokens DIR/chain/tokens --tokenizer DIR/chain/tokenizer --out DIR/chain/transformer ...
    sample DIR/chain/transformer --out DIR/chain/samples

It ends by printing the `nextdetail view` command that shows all of it in a browser.

A handful of photos and a few hundred steps make a tokenizer and a transformer that run, not
ones that generate convincing images: the chain shows the commands and their files.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from . import cli
from .decomp.at import BACKENDS
from .decomp.files import output_names
from .imageio import list_images, save_png
from .options import add_options, build, opt
from .runs import LOG, PLOT, checkpoints
from .stores.atomic import atomic_write
from .viz import contact_sheet

# skimage.data loaders whose files are inside the wheel (skimage/data/*.png), unlike the
# pooch-fetched ones; natural photos with faces, fur, texture and smooth backgrounds.
BUNDLED_PHOTOS = ("astronaut", "coffee", "chelsea")
# The dataset job's store inside --out, beside the per-image folders of `decompose`. Should
# an input be called dataset-store.png, the job refuses that foreign folder; nothing is lost.
STORE_NAME = "dataset-store"
CHAIN_NAME = "chain"


def write_bundled_photos(folder: Path) -> List[Path]:
    """Save BUNDLED_PHOTOS as PNGs in `folder`; returns their paths."""
    try:
        import skimage.data
    except ImportError as e:
        raise RuntimeError(f"the demo photos come from scikit-image ({e}); "
                           "pip install 'nextdetail[demo]' or pass --images") from None
    paths = []
    for name in BUNDLED_PHOTOS:
        rgb = getattr(skimage.data, name)()          # uint8 (H, W, 3)
        paths.append(save_png(rgb, folder / f"{name}.png"))
    return paths


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `python -m nextdetail.demo` (`make demo`)."""

    out: Path = opt(Path("out/demo"), "output folder", metavar="DIR")
    images: Optional[Tuple[str, ...]] = opt(None, "image files or folders (default: photos bundled with "
                                                  "scikit-image)", nargs="+", metavar="PATH", type=str)
    size: int = opt(256, "center-crop to N x N; 0 keeps the original size", metavar="N")
    backend: str = opt("auto", "solver backend", choices=BACKENDS)
    chain: bool = opt(True, "then run the generation chain (tokenizer, tokens, transformer, samples)",
                      action=argparse.BooleanOptionalAction)
    chain_size: int = opt(64, "image side of the chain", metavar="N")
    tokenizer_steps: int = opt(300, "chain: tokenizer steps", metavar="N")
    train_steps: int = opt(300, "chain: transformer steps", metavar="N")
    decompositions: bool = opt(False, "instead: the paper's three decompositions (base_detail, intrinsic, "
                                      "specular) of the photos, a folder and contact sheets each")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextdetail.demo", description=__doc__.split("\n\n")[0])
    add_options(p, DemoConfig)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build(DemoConfig, build_parser().parse_args(argv))
    if args.images:
        inputs = [str(p) for p in args.images]
    else:
        try:
            inputs = [str(p) for p in write_bundled_photos(args.out / "inputs")]
        except RuntimeError as e:
            print(f"demo: error: {e}", file=sys.stderr)
            return 1
    if args.decompositions:
        return run_decompositions(inputs, args.out, size=args.size, backend=args.backend)
    argv_cli = ["decompose", *inputs, "--out", str(args.out), "--backend", args.backend]
    if args.size:
        argv_cli += ["--size", str(args.size)]
    started = time.time()
    status = cli.main(argv_cli)
    # Same names as the CLI gives its folders, computed by the same functions; a sheet older
    # than this run is a leftover of an earlier one whose image failed now, so not listed.
    names = output_names(list_images(inputs))
    sheets = [args.out / n / "contact.png" for n in names]
    sheets = [s for s in sheets if s.is_file() and s.stat().st_mtime >= started - 1]
    if sheets:
        print("contact sheets (input, bases B_k, details D_k, edges s_k):")
        for s in sheets:
            print(f"  {s}")
    dataset_status = run_dataset_job(inputs, args.out / STORE_NAME, size=args.size or 256,
                                     backend=args.backend)
    chain_status = 0
    if args.chain:
        chain_status = run_chain(inputs, args.out / CHAIN_NAME, size=args.chain_size, backend=args.backend,
                                 tokenizer_steps=args.tokenizer_steps, train_steps=args.train_steps)
    if (command := view_command(args.out)):
        print(f"see it all in your browser (a local page on 127.0.0.1; Ctrl-C stops it):\n  {command}")
    return status or dataset_status or chain_status


def view_command(out: Path) -> Optional[str]:
    """The `nextdetail view` command line over what the demo wrote into `out` (the store, and the
    chain's store, tokenizer, token store, transformer and samples, those that are there), with the
    chain's tokenizer so that the token store's rows are decoded per depth; None when none is there."""
    import shlex

    chain = out / CHAIN_NAME
    found = [p for p in (out / STORE_NAME, chain / "store", chain / "tokenizer", chain / "tokens",
                         chain / "transformer", chain / "samples") if p.is_dir()]
    if not found:
        return None
    words = ["nextdetail", "view", *map(str, found)]
    if (chain / "tokens").is_dir() and checkpoints(chain / "tokenizer"):
        words += ["--tokenizer", str(chain / "tokenizer")]
    return shlex.join(words)


# Each decomposition at the order the paper uses it: base-detail 3 levels, intrinsic one
# albedo/shading pair (3 AT levels smooth the shading), specular 4 terms.
DECOMPOSITIONS = (("base_detail", 3, "input, bases B_k, details D_k, edges s_k"),
                  ("intrinsic", 3, "input, shading S, albedo A, the shading's edges"),
                  ("specular", 4, "input, diffuse bases A_k, specular terms E_k"))


def run_decompositions(inputs: Sequence[str], out: Path, *, size: int, backend: str) -> int:
    """`nextdetail decompose --method M` of the inputs for each of the three methods, into
    out/<method>/; prints where the contact sheets are."""
    status = 0
    names = output_names(list_images(inputs))
    for method, order, shows in DECOMPOSITIONS:
        argv = ["decompose", *inputs, "--out", str(out / method), "--method", method, "--order", str(order),
                "--backend", backend] + (["--size", str(size)] if size else [])
        print(f"$ nextdetail {' '.join(argv)}", flush=True)
        status = status or cli.main(argv)
        print(f"{method} contact sheets ({shows}):")
        for n in names:
            if (out / method / n / "contact.png").is_file():
                print(f"  {out / method / n / 'contact.png'}")
    return status


def run_dataset_job(inputs: Sequence[str], store: Path, *, size: int, backend: str) -> int:
    """`nextdetail decompose-dataset` on the same inputs, then a contact sheet of the store's
    first image, read back through DecompositionStore (so the demo shows the store works)."""
    from .decomp import Decomposition
    from .pipelines import DecompositionStore, StoreError

    store.parent.mkdir(parents=True, exist_ok=True)
    listing = write_listing(store.parent / f"{STORE_NAME}-inputs.txt", inputs)
    # --overwrite: the demo's store always follows the demo's current inputs and size.
    status = cli.main(["decompose-dataset", str(listing), "--out", str(store), "--size", str(size),
                       "--backend", backend, "--overwrite"])
    try:
        reader = DecompositionStore(store)
    except StoreError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return status or 1
    print(f"store: {store} ({len(reader)} of {reader.meta['counts']['images']} images ok; "
          f"read it with nextdetail.pipelines.DecompositionStore)")
    if len(reader):
        item = reader[0]
        row = reader.manifest.iloc[item.index]
        dec = Decomposition(bases=item.bases, details=item.details, edges=[],
                            energies=[row[f"energy_{k}"] for k in range(1, reader.order + 1)],
                            params=dict(reader.meta["at"]))
        sheet = store.parent / f"{STORE_NAME}-contact.png"
        # The store keeps no edge fields: the sheet has no third row.
        with atomic_write(sheet) as tmp:
            contact_sheet(dec, title=f"{Path(item.id).name} (read back from the store, 8-bit bases)").save(
                tmp, format="PNG")
        print(f"contact sheet of {Path(item.id).name} from the store (bases B_k, details D_k): {sheet}")
    return status


def write_listing(listing: Path, inputs: Sequence[str]) -> Path:
    """The image files of `inputs` as a listing (one absolute path a line), written atomically."""
    with atomic_write(listing) as tmp:
        tmp.write_text("".join(f"{p.resolve()}\n" for p in list_images(inputs)))
    return listing


def clear_run(folder: Path) -> None:
    """Remove a previous demo run's own files (checkpoints, log, plot) so it starts afresh;
    anything else in the folder is left alone."""
    if folder.is_dir():
        for f in [*checkpoints(folder), folder / LOG, folder / PLOT]:
            if f.is_file():
                f.unlink()


def run_chain(inputs: Sequence[str], out: Path, *, size: int, backend: str, tokenizer_steps: int,
              train_steps: int, method: str = "base_detail") -> int:
    """decompose-dataset -> train-tokenizer -> export-tokens -> train -> sample, each through
    nextdetail.cli.main exactly as a user types it; stops at the first failing step. `method`:
    the decomposition (at the order DECOMPOSITIONS gives it); the tokenizer takes its schedule
    from the store."""
    order = next(o for m, o, _ in DECOMPOSITIONS if m == method)
    store, tokenizer, tokens = out / "store", out / "tokenizer", out / "tokens"
    transformer, samples = out / "transformer", out / "samples"
    out.mkdir(parents=True, exist_ok=True)
    listing = write_listing(out / "inputs.txt", inputs)
    clear_run(tokenizer)
    clear_run(transformer)
    steps = [
        (["decompose-dataset", str(listing), "--out", str(store), "--size", str(size), "--backend", backend,
          "--overwrite"] + (["--method", method, "--order", str(order)] if method != "base_detail" else []),
         f"decomposition store: {store}"),
        (["train-tokenizer", "--data", str(store), "--out", str(tokenizer), "--image-size", str(size),
          "--downsample", "8", "--ch", "16", "--num-res-blocks", "1", "--no-attn", "--vocab", "512",
          "--steps", str(tokenizer_steps), "--batch-size", "4", "--lr", "1e-3", "--lpips-weight", "0",
          "--disc-start", str(10 ** 9), "--ckpt-every", str(tokenizer_steps)],
         f"tokenizer run (checkpoint, log.jsonl, loss.png): {tokenizer}"),
        (["export-tokens", "--data", str(store), "--tokenizer", str(tokenizer), "--out", str(tokens),
          "--workers", "1", "--overwrite"], f"token store: {tokens}"),
        (["train", "--tokens", str(tokens), "--tokenizer", str(tokenizer), "--out", str(transformer),
          "--depth", "2", "--width", "128", "--heads", "4", "--steps", str(train_steps), "--batch-size", "4",
          "--lr", "1e-3", "--warmup", str(min(20, train_steps)), "--val-fraction", "0",
          "--val-every", str(train_steps), "--ckpt-every", str(train_steps)],
         f"transformer run (checkpoint, log.jsonl with per-map loss, loss.png): {transformer}"),
        (["sample", str(transformer), "--out", str(samples), "--n", "4", "--seed", "0"],
         f"samples (grid.png; sample_XXX.png: base, then + each detail factor): {samples}"),
    ]
    for argv, where in steps:
        print(f"$ nextdetail {' '.join(argv)}", flush=True)
        status = cli.main(argv)
        if status not in (0, 1):          # 1: some images failed; the rest of the chain can still run
            print(f"demo: the chain stopped at `nextdetail {argv[0]}` (exit status {status})", file=sys.stderr)
            return status
        print(where, flush=True)
        if argv[0] == "train-tokenizer" and (note := usage_note(tokenizer)):
            print(note, flush=True)
    return 0


def usage_note(run: Path) -> Optional[str]:
    """What the demo says after the tokenizer's collapsing-codebook warning, when its last
    `map_usage` record has a map under 1% of the codes: a handful of photos give the coarsest
    maps only a handful of distinct values, so the warning is expected here and says nothing of a
    real run. None when no map is that low (or the run logged no usage)."""
    import json

    usage = None
    try:
        for line in (run / LOG).read_text().splitlines():
            usage = json.loads(line).get("map_usage", usage)
    except (OSError, ValueError):
        return None
    low = [k + 1 for k, u in enumerate(usage or []) if u < 0.01]
    if not low:
        return None
    maps = f"token map{'s' if len(low) > 1 else ''} {', '.join(map(str, low))}"
    return (f"note: the tokenizer's warning about {maps} (under 1% of the codes) is expected in this demo: "
            f"a coarse map of a handful of photos has only a handful of distinct values to code, so it "
            f"cannot use more codes. On a real dataset the coarse maps use many codes; where they do not, "
            f"more steps, a smaller --vocab or a lower --dead-after help (docs/tokenizer.md, codebook health).")


if __name__ == "__main__":
    sys.exit(main())
