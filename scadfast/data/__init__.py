"""Data: the embedded shapes set, source indexing, and loading — NVIDIA DALI, or in memory (docs/design.md §8).

``make_loader`` lives in :mod:`scadfast.data.loader`, ``DALILoader`` in :mod:`scadfast.data.dali`,
``MemoryLoader`` in :mod:`scadfast.data.memory`; they are imported lazily, and none of them imports
DALI until a DALI pipeline is built, so ``import scadfast.data`` does not import it.
"""

from .shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    MENTION_PROB,
    PromptTemplate,
    caption_templates,
    default_cache_dir,
    format_caption,
    free_attributes,
    iter_prompts,
    load_shapes_index,
    make_shapes_dataset,
    parse_caption,
    prompts_with_free_attributes,
    render,
    sample_attrs,
    sample_prompt_attrs,
    sample_prompts,
)
from .sources import DataSpec, DataWarning, RecordSet, expand_braces, load_records, parse_data_spec

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_NAMES", "MENTION_PROB", "PromptTemplate", "caption_templates",
    "default_cache_dir", "format_caption", "free_attributes", "iter_prompts", "load_shapes_index",
    "make_shapes_dataset", "parse_caption", "prompts_with_free_attributes", "render",
    "sample_attrs", "sample_prompt_attrs", "sample_prompts",
    "DataSpec", "DataWarning", "RecordSet", "expand_braces", "load_records", "parse_data_spec",
    "DALILoader", "MemoryLoader", "make_loader",
]


def __getattr__(name):
    if name in ("DALILoader", "MemoryLoader", "make_loader"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
