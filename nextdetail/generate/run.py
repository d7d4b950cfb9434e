"""A trained `nextdetail train` run as generation loads it: the transformer, its tokenizer (whose
quantizer gives the schedule), and what the commands show of it (classes, strip names)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ..storage import as_path, is_url
from ..tokenize import CheckpointError, Tokenizer
from ..train.model import NextDetailTransformer, TransformerConfig
from .options import SampleError


@dataclass
class Run:
    """A trained `nextdetail train` run, loaded for generation (`load_run`): the transformer of
    its latest checkpoint and the tokenizer its tokens came from, on one device.

    The tokenizer's quantizer is the run's schedule: the token maps the model draws, M of
    sides p_1..p_M, are its maps (`num_base` base maps, then `order` detail factors), and it
    turns drawn maps into features and images.

    Parameters
    ----------
    model : NextDetailTransformer
        In eval mode; model.cfg.map_shapes are the quantizer's (p_k, p_k).
    tokenizer : Tokenizer
        The tokenizer checkpoint the run records, or the one passed as --tokenizer, checked
        by its sha256.
    checkpoint : Path
        The transformer checkpoint loaded (ckpt-<step>.pt).
    meta : dict
        "step" (int), "tokenizer" (its checkpoint path, str), "tokens" (the token store the
        run trained on, str or None), "class_names" (list, a label's folder name or None).

    Attributes
    ----------
    num_base : int
        B, the base maps the draw starts with.
    order : int
        n, the detail factors after the base (0: a one-stage tokenizer).

    Examples
    --------
    ::

        run = load_run("RUN2", device="cuda")         # a run folder or a checkpoint file
        q = run.tokenizer.quantizer
        g = generate(run.model, q, torch.tensor([207, 207]), cfg=1.5, num_base=run.num_base,
                     order=run.order, generator=torch.Generator("cuda").manual_seed(0))
        images = decode(run.tokenizer, g.f_hat)        # uint8 (2, S, S, 3) (generate.images)
        strips = [decode(run.tokenizer, f) for f in g.f_stages]   # base, +D_n, ..., +D_1
        strip_names(run)                               # ['B_3', '+D_3', '+D_2', '+D_1']
    """

    model: NextDetailTransformer
    tokenizer: Tokenizer
    checkpoint: Path
    meta: dict

    @property
    def num_base(self) -> int:
        """The base maps B of the run's tokens: the tokenizer's schedule (the token store was exported with it)."""
        return self.tokenizer.quantizer.num_base

    @property
    def order(self) -> int:
        """The detail factors after the base (0: a one-stage tokenizer)."""
        return self.tokenizer.quantizer.order


def load_run(run, tokenizer=None, device="cpu") -> Run:
    """A trained transformer and its tokenizer: the latest checkpoint of a training run folder
    (or a checkpoint file) with the tokenizer it recorded, or a transformer model folder
    (export-model) with its tokenizer/. `tokenizer` (a run folder, checkpoint or model folder)
    replaces the recorded one; it must be the same tokenizer (sha256 of its checkpoint)."""
    from ..pretrained import ModelFolderError, is_model_folder, read_model_config, resolve_model
    from ..runs import RunError

    try:
        path = resolve_model(run)
    except (RunError, ModelFolderError) as e:
        raise SampleError(f"{e} (a `nextdetail train` run)") from None
    if is_model_folder(path):
        model = NextDetailTransformer.from_pretrained(path, map_location=device)
        config = read_model_config(path, "transformer")
        wanted = config["tokenizer"]["sha256"]
        recorded = path / config["tokenizer"]["folder"]
        meta = {"step": config["source"].get("step", 0), "tokens": config.get("data", {}).get("tokens"),
                "class_names": list(config.get("class_names") or [])}
    else:
        model, ck = _transformer_checkpoint(path, device)
        wanted, recorded = ck["tokenizer"]["sha256"], as_path(ck["tokenizer"]["checkpoint"])
        meta = {"step": ck["step"], "tokens": ck["data"].get("tokens"),
                "class_names": list(ck["data"].get("class_names") or [])}
    tok_path, tok = _tokenizer(path, tokenizer, recorded, wanted, device)
    return Run(model, tok, path, {"tokenizer": str(tok_path), **meta})


def _transformer_checkpoint(path: Path, device):
    """The transformer of a `nextdetail train` checkpoint file, and the checkpoint."""
    from ..runs import RunError, checkpoint_kind, load_checkpoint

    try:
        ck = load_checkpoint(path, device, what="`nextdetail train` checkpoint")
    except RunError as e:
        raise SampleError(f"{e} (a `nextdetail train` run)") from None
    kind = checkpoint_kind(ck)
    if not kind.startswith("transformer"):
        raise SampleError(f"{path}: a {kind}, not a transformer run (nextdetail train)")
    try:
        mcfg = TransformerConfig.from_dict(ck["model_config"])
    except Exception as e:  # missing keys, wrong types
        raise SampleError(f"{path}: not a `nextdetail train` checkpoint ({type(e).__name__}: {e})") from None
    model = NextDetailTransformer(mcfg).to(device)
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def _tokenizer(path: Path, given, recorded: Path, wanted: str, device):
    """(where it is, Tokenizer): `given` or the recorded one, refused unless its sha256 (of its
    checkpoint, or of the one a model folder came from) is the one the transformer recorded."""
    from ..pretrained import ModelFolderError, model_sha256, resolve_model
    from ..runs import RunError

    try:
        # A tokenizer recorded as a URL (trained from a bucket) is fetched like a given one.
        tok_path = resolve_model(given) if given is not None else \
            resolve_model(recorded) if is_url(recorded) else recorded
    except (RunError, ModelFolderError) as e:
        raise SampleError(str(e)) from None
    if not tok_path.exists():
        raise SampleError(f"{path}: its tokenizer {tok_path} is not here; pass --tokenizer RUN")
    if model_sha256(tok_path) != wanted:
        raise SampleError(f"tokenizer {tok_path} is not the one {path} was trained with ({recorded})")
    try:
        return tok_path, Tokenizer.from_pretrained(tok_path, map_location=device).to(device)
    except (CheckpointError, ModelFolderError) as e:
        raise SampleError(str(e)) from None


def strip_names(run: Run) -> List[str]:
    """What each image of a sample's strip shows, under its decomposition's factor names: the
    base, then the factors added one by one (B_3, +D_3, +D_2, +D_1; A_4, +E_4, ...; S_1, +A_1)."""
    from ..decomp import method_info

    names = method_info(run.tokenizer.config.decomposition).layer_names(run.order)
    return [names[0]] + [f"+{n}" for n in names[1:]]


def class_label(value: str, class_names: Sequence[Optional[str]]) -> int:
    """--class as given: an integer label, or a class name of the training data (its folder name)."""
    try:
        return int(value)
    except ValueError:
        pass
    if value in class_names:
        return list(class_names).index(value)
    known = ", ".join(f"{i}={c}" for i, c in enumerate(class_names) if c) or "none (integer labels only)"
    raise SampleError(f"--class {value!r}: not a class of this model's training data; its names: {known}")
