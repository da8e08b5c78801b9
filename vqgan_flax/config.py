"""VQ-GAN hyperparameters, named as in taming-transformers' `ddconfig` so a taming yaml maps 1:1."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from vqgan_flax.json_object import positive_int

_GROUPS = 32  # taming's GroupNorm(32, ...): every normalised channel count must divide by it


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Architecture of a taming VQModel (Encoder/Decoder ddconfig plus the codebook).

    Defaults are LLM-CXR's f16 tokenizer: 256² RGB -> 16×16 codes from a 1024-entry codebook.
    """

    double_z: bool = False
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    n_embed: int = 1024
    embed_dim: int = 256

    def __post_init__(self) -> None:
        sizes = ("z_channels", "resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "n_embed", "embed_dim")
        if bad := [f"{name}={getattr(self, name)!r}" for name in sizes if not positive_int(getattr(self, name))]:
            raise ValueError(f"invalid VQGANConfig: {', '.join(bad)} must be positive ints")
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        problems = []
        if self.double_z:
            problems.append("double_z must be false: a VQModel's quant_conv takes z_channels inputs")
        if not self.ch_mult:
            problems.append("ch_mult must not be empty")
        if any(m < 1 for m in self.ch_mult):
            problems.append(f"ch_mult {self.ch_mult} must hold multipliers of at least 1")
        for channels in {self.ch * m for m in self.ch_mult}:
            if channels % _GROUPS:
                problems.append(f"ch*ch_mult gives {channels} channels, not a multiple of {_GROUPS} (GroupNorm)")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % factor:
            problems.append(f"resolution {self.resolution} is not divisible by the downsampling factor {factor}")
        if self.n_embed < 1 or self.n_embed > 2**15:
            problems.append(f"n_embed {self.n_embed} must be in 1..32768 (codes are stored as int16)")
        if problems:
            raise ValueError("invalid VQGANConfig: " + "; ".join(problems))

    @property
    def grid(self) -> tuple[int, int]:
        """Latent (h, w): one code per `2**(len(ch_mult)-1)` pixels along each side."""
        side = self.resolution // 2 ** (len(self.ch_mult) - 1)
        return side, side

    @property
    def num_codes(self) -> int:
        return self.n_embed

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ch_mult"] = list(self.ch_mult)
        out["attn_resolutions"] = list(self.attn_resolutions)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VQGANConfig:
        """Strict: unknown or missing fields are errors, so a typo never silently becomes a default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"{source}: unknown fields {unknown}, missing fields {missing}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_taming_yaml(cls, path: str | Path) -> VQGANConfig:
        """Reads `model.params.{ddconfig, n_embed, embed_dim}` of a taming training yaml."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
            params = doc["model"]["params"]
            data = dict(params["ddconfig"], n_embed=params["n_embed"], embed_dim=params["embed_dim"])
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read taming yaml: {err}") from err
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a taming VQModel yaml (needs model.params.ddconfig, "
                             f"model.params.n_embed, model.params.embed_dim): missing {err}") from err
        return cls.from_dict(data, source=str(path))


PRESETS: dict[str, VQGANConfig] = {
    "f16": VQGANConfig(),
    # Small enough for CPU tests: 32² -> 16×16 codes, one attention level, one channel change.
    "tiny": VQGANConfig(z_channels=32, resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(16,), n_embed=64, embed_dim=32),
}
