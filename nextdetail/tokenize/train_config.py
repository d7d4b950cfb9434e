"""The settings of `nextdetail train-tokenizer`: the tokenizer it trains (nested) and how.

A checkpoint saves them as a dict (`to_dict`); a resumed run must ask for the same ones but for
RESUMABLE_CHANGES (`differences`), so a resume continues the same run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

from ..errors import ConfigError
from ..options import check_int, flag_of, nested, opt
from ..runs import RunConfig, checkpoint_differences
from ..stores.decomposition import StoreError
from ..weights import offline_opt
from .config import TokenizerConfig


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainConfig(RunConfig):
    """Settings of `nextdetail train-tokenizer`: the tokenizer (nested) and its training."""

    data: str = opt(help="decomposition store", metavar="STORE")
    out: str = opt(help="run folder", metavar="RUN")
    tokenizer: TokenizerConfig = nested(TokenizerConfig)
    batch_size: int = opt(8, "images per step", ge=1)
    lr: float = opt(1e-4, "AdamW learning rate (generator and discriminator)", gt=0)
    betas: tuple = (0.5, 0.9)
    weight_decay: float = opt(1e-4, "AdamW weight decay", ge=0)
    lpips_weight: float = opt(1.0, "LPIPS weight; 0 switches LPIPS off", ge=0)
    lpips_net: str = opt("alex", "LPIPS backbone", choices=("alex", "vgg", "squeeze"))
    lpips_backbone: str = opt("pretrained", "random LPIPS backbone instead of the pretrained weights from "
                                            "the torch hub cache (offline tests; warns)",
                              flag="--lpips-random-backbone", action="store_const", const="random")
    offline: bool = offline_opt()
    disc: str = opt("patchgan", "discriminator: PatchGAN (a logit per patch) or the StyleGAN2-style residual "
                                "one the CART paper names (a logit per image, minibatch std)",
                    choices=("patchgan", "stylegan"))
    disc_weight: float = opt(0.1, "GAN loss weight", ge=0)
    disc_start: int = opt(2000, "step from which the discriminator trains, and its loss counts", ge=0)
    disc_ch: int = opt(64, "discriminator width (channels of its first layer)", ge=1)
    disc_mbstd_group: int = opt(4, "stylegan: images per minibatch-std group (within a process's batch)", ge=1)
    r1_gamma: float = opt(0.0, "R1 penalty: D loss + gamma/2 E|grad_x D(x)|^2 over real images (StyleGAN's "
                               "regulariser); 0: off", metavar="GAMMA", ge=0)
    adaptive_gan: bool = opt(False, "scale the GAN loss by |grad rec| / |grad G| at the decoder's last layer "
                                    "(VQGAN)", flag="--adaptive-gan-weight")
    ema: float = opt(0.0, "keep an EMA of the weights with this decay (e.g. 0.999); 0: off", metavar="DECAY", ge=0, lt=1)
    loader_workers: int = opt(-1, "loader worker processes per training process; -1: from the CPU count "
                                  "(CPUs per process - 1, at most 8)", ge=-1)
    loader_lanes: int = opt(0, "lanes of the data stream, a multiple of the number of processes; the batches "
                               "depend on it, not on the process count; 0: the number of processes", ge=0)
    shuffle_buffer: int = opt(256, "images read, shuffled and cropped together (one loader work item)", ge=1)
    compile: bool = opt(False, "torch.compile the encoder, decoder and discriminator (first steps slower: "
                               "compilation)")
    usage_every: int = opt(100, "steps over which each token map's codebook usage is counted (logged as "
                                "map_usage; a warning when a map uses < 1%% of the codes after two windows)", ge=1)

    def __post_init__(self):
        super().__post_init__()
        # Paths as str: the config is saved in checkpoints, which hold plain data only.
        for name in ("data", "out"):
            object.__setattr__(self, name, str(getattr(self, name)))
        object.__setattr__(self, "betas", tuple(self.betas))
        check_int("batch_size", self.batch_size)
        if self.r1_gamma < 0:
            raise ConfigError(f"--r1-gamma {self.r1_gamma}: must be >= 0")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema {self.ema}: must be in [0, 1)")
        if self.loader_workers < -1:
            raise ConfigError(f"--loader-workers {self.loader_workers}: must be >= 0, or -1 (from the CPU count)")
        if self.loader_lanes < 0:
            raise ConfigError(f"--loader-lanes {self.loader_lanes}: must be >= 0 (0: the number of processes)")
        check_int("shuffle_buffer", self.shuffle_buffer)
        check_int("usage_every", self.usage_every)
        check_int("disc_mbstd_group", self.disc_mbstd_group)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokenizer"] = self.tokenizer.to_dict()
        return d

    @classmethod
    def derive(cls, args) -> None:
        """On the command line the tokenizer is for the decomposition of the store it trains on
        (options.derived). A store that cannot be read is refused later, with its reason."""
        from ..stores.decomposition import read_meta
        try:
            args.decomposition = read_meta(args.data)["method"]
        except StoreError:
            pass

    # Fields a resumed run may change: where it writes and how long it goes on.
    RESUMABLE_CHANGES = ("steps", "out", "ckpt_every", "loader_workers", "compile", "offline") + RunConfig.CONTROL_FIELDS

    def differences(self, other: "TokenizerTrainConfig") -> List[str]:
        """The tokenizer's differences first, named as in its own config ('quant.vocab ...')."""
        return (self.tokenizer.differences(other.tokenizer)
                + checkpoint_differences(self, other, ignore=self.RESUMABLE_CHANGES + ("tokenizer",)))


def lpips_without() -> str:
    """What a missing LPIPS backbone's message offers instead: the options that train without it."""
    return (f"{flag_of(TokenizerTrainConfig, 'lpips_weight')} 0 trains without LPIPS, "
            f"{flag_of(TokenizerTrainConfig, 'lpips_backbone')} with a random backbone")
