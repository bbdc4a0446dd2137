"""vLLM plugin registration (entry point group `vllm.general_plugins`), run in every vLLM process.

Cheap and re-entrant: model classes are registered lazily as "module:Class" strings; nothing heavy
is imported until vLLM builds a model.
"""

from __future__ import annotations

from ..errors import TransMLAError
from ..registry import families, target_architectures

MODELS_MODULE = "vllm_transmla.serving.models"
CPU_DEFAULT_BLOCK_SIZE = 128  # what vLLM's CPU platform gives every model it does not force to 16


def register_vllm() -> None:
    from .vllm_compat import check_version

    check_version()
    from vllm import ModelRegistry
    from vllm.transformers_utils import model_arch_config_convertor as convertors

    from .arch_config import TransMLAArchConfigConvertor

    supported = set(ModelRegistry.get_supported_archs())
    for arch in target_architectures():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
    for spec in families().values():
        convertors.MODEL_ARCH_CONFIG_CONVERTORS[spec.target_model_type] = TransMLAArchConfigConvertor
    install_checkpoint_check()
    keep_cpu_defaults_for_our_models()
    install_parallel_check()


def install_parallel_check() -> None:
    """vLLM's per-architecture config hook (MODELS_CONFIG_MAP, run before vLLM's own parallel checks):
    a tensor-parallel size that does not divide the query heads (or, with grouped latents, the groups) is
    refused in one line naming the sizes that work; TPLA (`mla_tpla_shards`) needs the shards to equal TP."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class TransMLAParallelCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from ..hf.configuration import latent_groups

            hf_config = vllm_config.model_config.hf_config
            heads, groups = hf_config.num_attention_heads, latent_groups(hf_config)
            tp = vllm_config.parallel_config.tensor_parallel_size
            shards = int(getattr(hf_config, "mla_tpla_shards", 1) or 1)
            if shards > 1:  # TPLA: every rank holds every head and one latent slice (serving/attention.py)
                if shards != tp:
                    raise TransMLAError(f"mla_tpla_shards={shards} must equal --tensor-parallel-size {tp}: each rank "
                                        f"caches one slice of the latent; set both to the same number")
                return
            # Grouped latents are split across ranks with their heads (serving/attention.py): TP divides G.
            count, what = (groups, "latent groups") if groups > 1 else (heads, "attention heads")
            if count % tp:  # TransMLAError is no ValueError, so pydantic passes it on unwrapped
                sizes = ", ".join(str(n) for n in range(1, count + 1) if count % n == 0)
                raise TransMLAError(f"{vllm_config.model_config.model} has {count} {what}, which "
                                    f"--tensor-parallel-size {tp} does not divide: use one of {sizes}")

    for arch in target_architectures():
        MODELS_CONFIG_MAP.setdefault(arch, TransMLAParallelCheck)


def keep_cpu_defaults_for_our_models() -> None:
    """Give our models on CPU the chunked prefill, prefix caching and block size vLLM gives every other model.

    vLLM's CPU platform turns chunked prefill and prefix caching off for every MLA model, because its stock
    CPU MLA path lacks the attention over cached context they need, and forces 16-token blocks, the only
    size its stock MLA decode kernel compiles for. Our backend has the context attention
    (`LatentPrefillBackend.run_prefill_context_chunk`) and takes any block size; with the CPU default of
    128 each 64-token tile of the decode kernel lies in one block, which an fp32 cache then reads in place.
    So for our architectures the settings the user (or vLLM's defaults) chose before the platform's
    override are put back. Wraps the platform's `check_and_update_config` once; other models pass
    straight through."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config  # bound to the class
    if getattr(original, "_transmla_cpu_defaults", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        asked = (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens, cache.enable_prefix_caching)
        asked_block = cache.block_size if cache.user_specified_block_size else CPU_DEFAULT_BLOCK_SIZE
        original(vllm_config)
        if _serves_with_our_backend(vllm_config.model_config):
            scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens, cache.enable_prefix_caching = asked
            cache.block_size = asked_block
            _logger().info("vllm-transmla: our MLA backend serves %s on CPU with chunked prefill %s, prefix caching "
                           "%s and %d-token blocks (what was asked before vLLM's CPU platform turned them off for "
                           "MLA models)", vllm_config.model_config.architectures[0],
                           "on" if asked[0] else "off", "on" if asked[2] else "off", asked_block)

    check_and_update_config._transmla_cpu_defaults = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.plugins.transmla")


def _serves_with_our_backend(model_config) -> bool:
    """Whether vLLM will build this model from our model classes (which always use our MLA backend)."""
    if model_config is None:
        return False
    return bool(set(model_config.architectures or []) & set(target_architectures()))


def install_checkpoint_check() -> None:
    """Validate a local converted checkpoint (vllm_transmla.validate) when vLLM parses its config, i.e. before
    vLLM builds anything from it. Wraps HFConfigParser.parse once; other checkpoints pass straight through."""
    from vllm.transformers_utils import config as vllm_config

    parser_cls = getattr(vllm_config, "HFConfigParser", None)
    original = getattr(parser_cls, "parse", None)
    if original is None or getattr(original, "_transmla_checked", False):
        return

    def parse(self, model, *args, **kwargs):
        check_local_checkpoint(model)
        return original(self, model, *args, **kwargs)

    parse._transmla_checked = True
    parser_cls.parse = parse


def check_local_checkpoint(model) -> None:
    """Run our validation if `model` is a local directory whose config.json claims one of our architectures."""
    import json
    from pathlib import Path

    from ..validate import is_converted_config, validate_converted_checkpoint

    config = Path(str(model)) / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # not a local checkpoint, or one vLLM itself will report on
    if isinstance(raw, dict) and is_converted_config(raw):
        validate_converted_checkpoint(config.parent)
