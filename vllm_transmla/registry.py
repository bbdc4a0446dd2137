"""Per-family specs read from `model_registry/*.toml` (data only).

The converter uses them to find and check source weights; the vLLM plugin and the transformers
registration use them to know which MLA architectures and model_types exist.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import TransMLAError


@dataclass(frozen=True)
class FamilySpec:
    family: str
    source_architectures: tuple[str, ...]
    source_model_types: tuple[str, ...]
    target_architecture: str
    target_model_type: str
    attention: dict
    rope: dict
    embeddings: dict
    moe: dict = field(default_factory=dict)
    sliding_window: dict = field(default_factory=dict)
    refuse: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    def attn_name(self, role: str, layer: int) -> str:
        """Weight-name prefix of `role` (q_proj, k_proj, v_proj, o_proj; q_norm, k_norm) in decoder layer `layer`."""
        return self.attention[role].format(prefix=f"model.layers.{layer}")

    @property
    def head_norms(self) -> bool:
        """Whether each query and key head is RMS-normalized before RoPE (Qwen3's q_norm / k_norm)."""
        return "k_norm" in self.attention

    def has_bias(self, which: str, config) -> bool:
        """Whether the source has q/k/v (`which="qkv_bias"`) or o (`"o_bias"`) biases."""
        rule = self.attention[which]
        if rule in ("never", "always"):
            return rule == "always"
        return bool(getattr(config, rule, False))


def _registry_dir() -> Path:
    # Installed (wheel or editable): the data ships as package `vllm_transmla.model_registry`.
    try:
        path = Path(str(resources.files("vllm_transmla.model_registry")))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "model_registry"


@functools.cache
def families() -> dict[str, FamilySpec]:
    """All family specs, keyed by family name."""
    specs = {}
    for path in sorted(_registry_dir().glob("*.toml")):
        if path.stem == "unsupported":
            continue
        data = tomllib.loads(path.read_text())
        data["source_architectures"] = tuple(data["source_architectures"])
        data["source_model_types"] = tuple(data["source_model_types"])
        specs[data["family"]] = FamilySpec(**data)
    return specs


@functools.cache
def unsupported_reasons() -> dict[str, str]:
    path = _registry_dir() / "unsupported.toml"
    return tomllib.loads(path.read_text())["reasons"] if path.exists() else {}


def target_architectures() -> dict[str, str]:
    """MLA architecture name -> its model_type (several families may share one architecture)."""
    return {s.target_architecture: s.target_model_type for s in families().values()}


def family_for_source(architectures: list[str] | None, model_type: str | None) -> FamilySpec:
    """The family that converts a source checkpoint, or a TransMLAError saying why none does."""
    architectures = list(architectures or [])
    converted = [a for a in architectures if a in target_architectures()]
    if converted or model_type in set(target_architectures().values()):
        raise TransMLAError(f"this checkpoint is already an MLA model ({converted[0] if converted else model_type}, "
                            f"written by a TransMLA converter): serve or fine-tune it as it is, or convert its "
                            f"original GQA source to get another shape")
    for arch in architectures:
        if arch in unsupported_reasons():
            raise TransMLAError(
                f"unsupported architecture {arch}: {unsupported_reasons()[arch]}; "
                f"supported: {', '.join(supported_source_architectures())}"
            )
    for spec in families().values():
        if any(a in spec.source_architectures for a in architectures):
            if model_type not in spec.source_model_types:
                raise TransMLAError(
                    f"config.json says architectures={architectures} but model_type={model_type!r} "
                    f"(expected one of {list(spec.source_model_types)}); fix the config's model_type"
                )
            return spec
    if not architectures:
        for spec in families().values():
            if model_type in spec.source_model_types:
                return spec
    raise TransMLAError(
        f"unsupported architecture {architectures or model_type!r}: supported are "
        f"{', '.join(supported_source_architectures())}; add a model_registry/<family>.toml to support more"
    )


def supported_source_architectures() -> list[str]:
    return sorted(a for s in families().values() for a in s.source_architectures)
