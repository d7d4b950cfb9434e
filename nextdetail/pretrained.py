"""Model folders: a trained tokenizer or transformer as `export-model` writes it, loaded anywhere.

    DIR/model.safetensors   the weights (safetensors: tensors and a JSON header, no pickle)
    DIR/config.json         everything needed to rebuild the model (see below), and where it
                            came from
    DIR/README.md           the model card (nextdetail.export_model)
    DIR/tokenizer/          a transformer's folder only: its tokenizer, as a folder of its own

This is the layout huggingface_hub's ModelHubMixin uses (config.json and model.safetensors at
the root of a repo), so a folder can be pushed with `huggingface_hub.upload_folder` and fetched
with `snapshot_download`; `Tokenizer.from_pretrained` and `NextDetailTransformer.from_pretrained`
take a local folder or, with huggingface_hub installed, a repo id ("user/name").

config.json:
    format, format_version   "nextdetail-model", 1
    kind                     "tokenizer" or "transformer"
    config                   the model's own config (TokenizerConfig / TransformerConfig.to_dict:
                             architecture, quantizer and its map schedule, decomposition, image
                             size, vocabulary, classes)
    source                   {"checkpoint", "sha256", "step", "weights": "ema" | "final"}: the
                             training checkpoint the weights are from. Its sha256 is the model's
                             identity: token stores and transformer runs record it, so a folder
                             stands wherever its checkpoint did.
    ...                      what the kind adds (schedule, decomposition, data, class names)

Every load is verified: a missing or extra tensor, a tensor of another shape, a config.json of
another kind or format is refused in one line naming the folder (ModelFolderError, exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from . import __version__
from .errors import PathError
from .model_fetch import CONFIG, WEIGHTS
from .storage import as_path, is_local, is_url
from .stores.atomic import atomic_write, write_bytes_atomic
from .stores.journal import OutputFolder

if TYPE_CHECKING:
    import torch

CARD = "README.md"
TOKENIZER = "tokenizer"          # a transformer folder's tokenizer, a model folder itself
FORMAT = "nextdetail-model"
FORMAT_VERSION = 1
KINDS = {"tokenizer": "tokenizer (nextdetail train-tokenizer)", "transformer": "transformer (nextdetail train)"}


class ModelFolderError(PathError):
    """A model folder that cannot be used as asked; str is one line naming it."""


# A model folder as an output (nextdetail.stores.journal): --overwrite replaces exactly these.
MODEL_FOLDER = OutputFolder("model folder", (WEIGHTS, CONFIG, CARD, TOKENIZER), ModelFolderError, mark=CONFIG)


def is_model_folder(path) -> bool:
    path = as_path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def hub_folder(name) -> Path:
    """A local folder as given, or a Hugging Face repo id ("user/name") fetched into the hub's
    cache (huggingface_hub's snapshot_download: HF_HUB_OFFLINE=1 reads the cache only)."""
    if is_url(name):            # a bucket's folder: resolve_model fetches it (fetch_model)
        return as_path(name)
    path = Path(name)
    if path.exists() or str(name).count("/") != 1 or str(name).startswith((".", "/")):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFolderError(path, "no such folder (a Hugging Face repo id needs `pip install huggingface_hub`)") \
            from None
    try:
        return Path(snapshot_download(str(name), allow_patterns=[WEIGHTS, CONFIG, CARD, f"{TOKENIZER}/*"]))
    except Exception as e:  # offline, unknown repo, no access: the hub's own reason, on one line
        from .errors import first_line
        raise ModelFolderError(path, f"no such folder, and not fetched from the Hugging Face hub "
                                     f"({type(e).__name__}: {first_line(e)})") from None


def read_model_config(path, kind: str) -> dict:
    """config.json of the model folder `path`, refused unless it is one of a `kind` model."""
    path = Path(path)
    if not is_model_folder(path):
        raise ModelFolderError(path, f"not a model folder (no {CONFIG} and {WEIGHTS}; nextdetail export-model "
                                     f"writes one)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(path / CONFIG, f"cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(path / CONFIG, "not a nextdetail model's config (no \"format\": \"nextdetail-model\")")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(path / CONFIG, f"model folder format {config.get('format_version')!r}; this nextdetail "
                                              f"reads version {FORMAT_VERSION}")
    if config.get("kind") != kind:
        found = KINDS.get(config.get("kind"), repr(config.get("kind")))
        raise ModelFolderError(path, f"a {found} model folder, not a {KINDS[kind]} one")
    return config


def load_weights(path, module, map_location="cpu") -> None:
    """Load DIR/model.safetensors into `module`, refusing a missing, extra or reshaped tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    try:
        weights = load_file(str(file), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(file, f"cannot read the weights ({type(e).__name__}: {e})") from None
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    for what, names in (("lacks the tensor", missing), ("has an unknown tensor", extra)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ModelFolderError(file, f"{what} {names[0]!r}{more}; not the weights of the model "
                                         f"{CONFIG} describes")
    if reshaped:
        k = reshaped[0]
        raise ModelFolderError(file, f"tensor {k!r} has shape {tuple(weights[k].shape)}, the model {CONFIG} "
                                     f"describes needs {tuple(expected[k].shape)}")
    module.load_state_dict(weights)


def write_model_folder(out, kind: str, state_dict: Dict[str, "torch.Tensor"], config: dict,
                       card: Optional[str] = None) -> Path:
    """DIR/model.safetensors, DIR/config.json (format, kind, version added) and DIR/README.md,
    each written whole (stores.atomic). The tensors are saved as stored (contiguous copies)."""
    from safetensors.torch import save_file

    out = as_path(out)
    if is_local(out):           # object storage has no folders: its objects' names make them
        out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_write(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "nextdetail_kind": kind})
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "nextdetail_version": __version__,
            **config}
    write_bytes_atomic(out / CONFIG, (json.dumps(full, indent=2) + "\n").encode())
    if card is not None:
        write_bytes_atomic(out / CARD, card.encode())
    return out


def model_sha256(path) -> str:
    """The identity of what a tokenizer argument names: the sha256 of a checkpoint file, or of
    the checkpoint a model folder's weights came from (its config.json "source")."""
    from .checksum import file_sha256

    path = Path(path)
    if path.is_dir() and is_model_folder(path):
        return str(json.loads((path / CONFIG).read_text())["source"]["sha256"])
    return file_sha256(path)


def resolve_model(path) -> Path:
    """What a model argument (--tokenizer, RUN) means: a model folder as it is, a run folder's
    latest checkpoint, or a checkpoint file (RunError when it is none of them). A URL
    (s3://...) is fetched once into the local cache first (nextdetail.model_fetch); otherwise a
    command never reaches for the network (from_pretrained takes hub repo ids)."""
    from .runs import latest_checkpoint

    if is_url(path):
        from .model_fetch import fetch_model
        return fetch_model(path)
    path = Path(path)
    return path if is_model_folder(path) else latest_checkpoint(path)


def model_source(path) -> str:
    """Where a resolved model or checkpoint came from, as recorded in what is made with it
    (token stores, transformer checkpoints, model folders): the URL it was fetched from, or the
    local path, resolved."""
    from .model_fetch import origin

    return origin(path) or str(Path(path).resolve())
