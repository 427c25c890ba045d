"""DistillKit's compression settings as typed configs: read from its YAML, checked, written back.

The fields, defaults and rules are those of DistillKit's `DistributionQuantizationConfig` and
`LegacyLogitCompressionConfig` (`distillkit/compression/config.py`; docs/interop.md names the commit
read). DistillKit stores them beside a capture as `compression_config.yaml` and needs them retyped at
training time under `teacher.logprob_compressor` (or `teacher.legacy_logit_compression`); either form,
or a whole DistillKit training config, is accepted here. Unknown keys are refused (DistillKit would
ignore a misspelt `delta_encoding` and decode with its default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from logitcache.errors import UserError

CONFIG_FILE = "compression_config.yaml"     # what DistillKit's capture writes beside its shards
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
SPECIAL_TERMS = ("sqrt", "exp")              # DistillKit's SpecialTerm values: torch.sqrt / torch.exp of the rank


def id_bits(d: int) -> int:
    """Bits per packed id: ceil(log2 d). DistillKit computes it in float32, which agrees for every d below
    2^20 and every vocabulary in use; the exact integer form is used here."""
    return max(1, (int(d) - 1).bit_length())


@dataclass(frozen=True)
class QuantBin:
    """One bin of quantised residuals: a scale in `scale_dtype`, then `num_elements` codes of `element_bits`."""

    scale_dtype: str
    element_bits: int
    num_elements: int

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.scale_dtype] + (self.element_bits * self.num_elements + 7) // 8

    def to_dict(self) -> dict:
        return {"element_bits": self.element_bits, "num_elements": self.num_elements, "scale_dtype": self.scale_dtype}


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's `DistributionQuantizationConfig`: per position, `bytepacked_indices` (k ids at
    ceil(log2 d) bits) and `compressed_logprobs` (exact values, polynomial coefficients, residual bins)."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple[int | str, ...] | None = None
    term_dtype: str = "float32"
    residual_bins: tuple[QuantBin, ...] = ()
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @property
    def id_bits(self) -> int:
        return id_bits(self.d)

    @property
    def index_bytes(self) -> int:
        """Bytes of `bytepacked_indices` per position."""
        return (self.k * self.id_bits + 7) // 8

    @property
    def terms(self) -> tuple[int | str, ...]:
        return tuple(self.polynomial_terms or ())

    @property
    def approx_terms(self) -> int:
        """Values after the exact ones: from the polynomial and the bins."""
        return self.k - self.exact_k

    @property
    def logprob_bytes(self) -> int:
        """Bytes of `compressed_logprobs` per position: exact values, coefficients, then each bin."""
        return (self.exact_k * DTYPE_BYTES[self.exact_dtype] + len(self.terms) * DTYPE_BYTES[self.term_dtype]
                + sum(b.nbytes for b in self.residual_bins))

    def describe(self) -> str:
        bins = ", ".join(f"{b.num_elements}x{b.element_bits}-bit ({b.scale_dtype} scale)" for b in self.residual_bins)
        return (f"k={self.k}, exact_k={self.exact_k} {self.exact_dtype}, terms {list(self.terms)} {self.term_dtype}, "
                f"bins [{bins}], delta_encoding={self.delta_encoding}")

    def to_dict(self) -> dict:
        """As DistillKit's `model_dump(mode="json")`: what its `compression_config.yaml` holds."""
        return {"d": self.d, "delta_encoding": self.delta_encoding, "error_diffusion": self.error_diffusion,
                "exact_dtype": self.exact_dtype, "exact_k": self.exact_k, "k": self.k,
                "normalize_t": self.normalize_t,
                "polynomial_terms": None if self.polynomial_terms is None else list(self.polynomial_terms),
                "residual_bins": [b.to_dict() for b in self.residual_bins], "term_dtype": self.term_dtype}


@dataclass(frozen=True)
class LegacyConfig:
    """DistillKit's `LegacyLogitCompressionConfig`: `packed_indices` (ids in 64-bit words), `exact_values`
    (the first exact_k values, fp16-rounded, stored as float32) and `coeffs` (a polynomial in 1-based rank)."""

    k: int
    exact_k: int
    polynomial_degree: int
    vocab_size: int
    invert_polynomial: bool = True
    with_sqrt_term: bool = False
    term_dtype: str = "float32"

    @property
    def id_bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def d(self) -> int:
        return self.vocab_size

    @property
    def per_word(self) -> int:
        """Ids per 64-bit word (no id straddles two words)."""
        return 64 // self.id_bits

    @property
    def words(self) -> int:
        return math.ceil(self.k / self.per_word)

    @property
    def num_coeffs(self) -> int:
        """Coefficients per position: none when every value is exact."""
        return self.polynomial_degree + 1 + int(self.with_sqrt_term) if self.exact_k < self.k else 0

    def describe(self) -> str:
        return (f"legacy k={self.k}, exact_k={self.exact_k}, degree {self.polynomial_degree}, "
                f"vocab_size={self.vocab_size}")

    def to_dict(self) -> dict:
        return {"exact_k": self.exact_k, "invert_polynomial": self.invert_polynomial, "k": self.k,
                "polynomial_degree": self.polynomial_degree, "term_dtype": self.term_dtype,
                "vocab_size": self.vocab_size, "with_sqrt_term": self.with_sqrt_term}


Config = CompressionConfig | LegacyConfig


def recommended(d: int) -> CompressionConfig:
    """DistillKit's recommended configuration (its README): ~300 B/token at k = 128 and a 152k vocabulary."""
    return CompressionConfig(d=d, k=128, exact_k=16, exact_dtype="bfloat16", polynomial_terms=(0, 1, 2, 3, 4, "sqrt"),
                             term_dtype="float32", delta_encoding=False, error_diffusion=False)


def budget(d: int) -> CompressionConfig:
    """DistillKit's budget configuration (its README): ~114 B/token."""
    return CompressionConfig(d=d, k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=(0, 1, "sqrt"),
                             term_dtype="float32", delta_encoding=False, error_diffusion=False)


PRESETS = {"recommended": recommended, "budget": budget}


def fit_preset(config: CompressionConfig, k: int) -> CompressionConfig:
    """A preset cut to a cache's k: fewer values than the preset asks for cannot be invented."""
    if config.k <= k:
        return config
    return replace(config, k=k, exact_k=min(config.exact_k, k))


# -- parsing -------------------------------------------------------------------------------------

_NEW = {"d", "k", "exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins", "delta_encoding",
        "error_diffusion", "normalize_t"}
_LEGACY = {"k", "exact_k", "polynomial_degree", "vocab_size", "invert_polynomial", "with_sqrt_term", "term_dtype"}
_BIN = {"scale_dtype", "element_bits", "num_elements"}


class _Fields:
    """Typed access to one mapping of a config, with errors naming the file and the key."""

    def __init__(self, raw: Any, where: str, known: set[str], what: str):
        if not isinstance(raw, dict):
            raise UserError(f"{where}: {what} must be a mapping of settings, not {type(raw).__name__}")
        unknown = sorted(str(key) for key in raw if key not in known)
        if unknown:
            raise UserError(f"{where}: unknown {what} setting(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
        self.raw, self.where = raw, where

    def int(self, key: str, least: int, default: int | None = None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise UserError(f"{self.where}: {key} is required")
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{self.where}: {key} must be an integer >= {least}, not {value!r}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise UserError(f"{self.where}: {key} must be true or false, not {value!r}")
        return value

    def dtype(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if value not in DTYPE_BYTES:
            raise UserError(f"{self.where}: {key} {value!r} is not one of {', '.join(DTYPE_BYTES)}")
        return value


def _terms(raw: Any, where: str) -> tuple[int | str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise UserError(f"{where}: polynomial_terms must be a list (powers of the rank, or "
                        f"{' / '.join(SPECIAL_TERMS)})")
    for term in raw:
        ok = term in SPECIAL_TERMS if isinstance(term, str) else (
            isinstance(term, int) and not isinstance(term, bool) and term >= 0)
        if not ok:   # a negative power is infinite at rank 0: no capture can have used one
            raise UserError(f"{where}: polynomial term {term!r} is neither a power >= 0 nor one of "
                            f"{', '.join(SPECIAL_TERMS)}")
    return tuple(raw)


def parse_compression(raw: Any, where: str) -> CompressionConfig:
    """DistributionQuantizationConfig from its mapping, with DistillKit's checks."""
    f = _Fields(raw, where, _NEW, "compression")
    if "residual_bins" not in raw:
        raise UserError(f"{where}: residual_bins is required (DistillKit's config has no default; [] for none)")
    if not isinstance(raw["residual_bins"], list):
        raise UserError(f"{where}: residual_bins must be a list")
    bins = []
    for i, item in enumerate(raw["residual_bins"]):
        b = _Fields(item, f"{where} residual_bins[{i}]", _BIN, "residual bin")
        bits = b.int("element_bits", 1)
        if bits > 64:
            raise UserError(f"{where}: residual_bins[{i}].element_bits {bits} is over 64")
        bins.append(QuantBin(b.dtype("scale_dtype"), bits, b.int("num_elements", 1)))
    cfg = CompressionConfig(d=f.int("d", 2), k=f.int("k", 1), exact_k=f.int("exact_k", 0),
                            exact_dtype=f.dtype("exact_dtype", "float32"),
                            polynomial_terms=_terms(raw.get("polynomial_terms"), where),
                            term_dtype=f.dtype("term_dtype", "float32"), residual_bins=tuple(bins),
                            delta_encoding=f.bool("delta_encoding", True),
                            error_diffusion=f.bool("error_diffusion", False),
                            normalize_t=f.bool("normalize_t", False))
    if cfg.k < cfg.exact_k:
        raise UserError(f"{where}: k ({cfg.k}) must be >= exact_k ({cfg.exact_k})")
    if cfg.exact_k < cfg.k and not cfg.terms and not cfg.residual_bins:
        raise UserError(f"{where}: exact_k < k needs polynomial_terms or residual_bins for the other values")
    if sum(b.num_elements for b in bins) > cfg.approx_terms:
        raise UserError(f"{where}: the residual bins hold more than k - exact_k = {cfg.approx_terms} elements")
    return cfg


def parse_legacy(raw: Any, where: str) -> LegacyConfig:
    """LegacyLogitCompressionConfig from its mapping, with DistillKit's checks."""
    f = _Fields(raw, where, _LEGACY, "legacy compression")
    cfg = LegacyConfig(k=f.int("k", 1), exact_k=f.int("exact_k", 0), polynomial_degree=f.int("polynomial_degree", 0),
                       vocab_size=f.int("vocab_size", 2), invert_polynomial=f.bool("invert_polynomial", True),
                       with_sqrt_term=f.bool("with_sqrt_term", False),
                       term_dtype=f.dtype("term_dtype", "float32"))
    if cfg.exact_k > cfg.k:
        raise UserError(f"{where}: exact_k ({cfg.exact_k}) must be <= k ({cfg.k})")
    if cfg.id_bits > 63:
        raise UserError(f"{where}: vocab_size {cfg.vocab_size} needs more than 63 bits per id")
    return cfg


def parse_config(raw: Any, where: str) -> Config:
    """A compression config from a parsed YAML document: the config itself, the `logprob_compressor` /
    `legacy_logit_compression` entry of a DistillKit training config, or a whole training config."""
    if isinstance(raw, dict) and isinstance(raw.get("teacher"), dict):
        raw = raw["teacher"]
    if isinstance(raw, dict):
        if raw.get("logprob_compressor") is not None:
            return parse_compression(raw["logprob_compressor"], f"{where} logprob_compressor")
        if raw.get("legacy_logit_compression") is not None:
            return parse_legacy(raw["legacy_logit_compression"], f"{where} legacy_logit_compression")
        if "d" in raw:
            return parse_compression(raw, where)
        if "vocab_size" in raw or "polynomial_degree" in raw:
            return parse_legacy(raw, where)
    raise UserError(f"{where}: not a DistillKit compression config (expected d, k, exact_k, ... or a training "
                    "config with teacher.logprob_compressor)")


def load_config(text: str, where: str) -> Config:
    """Parse the YAML text of a config file (safe_load only)."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: not YAML ({line})") from None
    return parse_config(raw, where)


def read_config_file(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    return load_config(path.read_text(encoding="utf-8"), str(path))


def yaml_text(config: Config) -> str:
    """The config as YAML, keys sorted as DistillKit's `yaml.safe_dump` writes them."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=True)
