"""A trained `nextdetail train` run as generation loads it: the transformer, its tokenizer (whose
quantizer gives the schedule), and what the commands show of it (classes, strip names)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

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
    """The latest checkpoint of a training run folder (or a checkpoint file) and its tokenizer
    (the recorded checkpoint, or `tokenizer`: a run folder or checkpoint with the same sha256)."""
    from ..runs import RunError, checkpoint_kind, latest_checkpoint, load_checkpoint
    from ..checksum import file_sha256

    try:
        path = latest_checkpoint(run)
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
    model.eval()
    try:
        tok_path = latest_checkpoint(tokenizer) if tokenizer is not None else Path(ck["tokenizer"]["checkpoint"])
    except RunError as e:
        raise SampleError(str(e)) from None
    if not tok_path.is_file():
        raise SampleError(f"{path}: its tokenizer {tok_path} is not here; pass --tokenizer RUN")
    if file_sha256(tok_path) != ck["tokenizer"]["sha256"]:
        raise SampleError(f"tokenizer {tok_path} is not the one {path} was trained with "
                          f"({ck['tokenizer']['checkpoint']})")
    try:
        tok = Tokenizer.from_checkpoint(tok_path, map_location=device).to(device)
    except CheckpointError as e:
        raise SampleError(str(e)) from None
    return Run(model, tok, path, {"step": ck["step"], "tokenizer": str(tok_path), "tokens": ck["data"].get("tokens"),
                                  "class_names": list(ck["data"].get("class_names") or [])})


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
    raise SampleError(f"class {value!r}: not a class of this model's training data; its names: {known}")
