"""Which weights train: the converted MLA projections, all attention weights and norms, or everything."""

from __future__ import annotations

from torch import nn

from ..hf.attention import MLAAttention

SCOPES = {
    "mla": "the projections the conversion wrote (q or q_a/q_b, kv_a_proj_with_mqa, kv_b_proj, o_proj; Qwen3: "
           "also q_head_proj, kv_a_key_proj)",
    "attention": "every attention weight and every RMSNorm",
    "all": "every weight of the model",
}
# o_proj too: a compressed conversion refits it to its own values (convert/refit.py); frozen, it held
# SmolLM2's 25% student back (held-out KJV after 40 steps: 53.2 frozen, 49.4 trained)
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_head_proj",
                   "kv_a_key_proj")


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") or isinstance(module, nn.LayerNorm)


def select_trainable(model: nn.Module, scope: str) -> list[str]:
    """Freeze every parameter of `model` outside `scope` (see SCOPES); returns the trained names."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: choose one of {', '.join(SCOPES)}")
    chosen: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if scope == "all":
            picked = module.named_parameters(recurse=False)
        elif isinstance(module, MLAAttention):
            wanted = MLA_PROJECTIONS if scope == "mla" else None
            picked = [(f"{child}.{n}", p) for child, sub in module.named_children()
                      if wanted is None or child in wanted for n, p in sub.named_parameters()]
        elif scope == "attention" and _is_norm(module):
            picked = module.named_parameters(recurse=False)
        else:
            continue
        chosen.update(prefix + name for name, _ in picked)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError(f"scope {scope!r} selects no parameters of {type(model).__name__}: is it a converted model?")
    return trained
