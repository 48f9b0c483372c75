"""Find a model's transformer block list from its structure (no per-architecture tables): the ``nn.ModuleList``
of identical-class blocks whose length equals the config's layer count. Used by the student builder
(:mod:`hf_kd.tools.student`), teacher placement and chains."""

from __future__ import annotations

from torch import nn

# Conventional config attribute names for the number of blocks (GPT-2 uses n_layer, DistilBERT
# n_layers, most others num_hidden_layers). Those whose value equals the block count are updated.
LAYER_COUNT_ATTRIBUTES = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, module_list)`` of the model's transformer blocks.

    Candidates are ``nn.ModuleList``s of identical-class blocks that hold parameters. If the model
    has a config with a layer count (see ``LAYER_COUNT_ATTRIBUTES``), only lists of that length
    qualify; among the candidates the one with the most parameters wins. Pass ``path`` to skip
    the search.
    """
    if path is not None:
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(model).__name__}.{path} is a {type(blocks).__name__}, not an nn.ModuleList")
        return path, blocks
    counts = set(_layer_counts(getattr(model, "config", None)).values())
    candidates = [(name, module) for name, module in model.named_modules() if _is_block_list(module)]
    if counts:
        candidates = [(name, module) for name, module in candidates if len(module) in counts]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: found no transformer layer list (an nn.ModuleList of identical "
            f"blocks whose length equals config.{' / '.join(LAYER_COUNT_ATTRIBUTES)}). Pass "
            "layers_path='dotted.path.to.the.ModuleList' to name the block list explicitly."
        )
    return max(candidates, key=lambda item: _num_parameters(item[1]))


def _layer_counts(config) -> dict[str, int]:
    if config is None:
        return {}
    values = {name: getattr(config, name, None) for name in LAYER_COUNT_ATTRIBUTES}
    return {name: value for name, value in values.items() if isinstance(value, int) and not isinstance(value, bool)}


def _is_block_list(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and _num_parameters(module) > 0
    )


def _num_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
