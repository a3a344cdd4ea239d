"""Data: the embedded shapes set, source indexing, and NVIDIA DALI loading (docs/design.md §8).

``make_loader``/``DALILoader`` live in :mod:`scadfast.data.dali` and are imported lazily, so
``import scadfast.data`` does not import DALI.
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
    "DALILoader", "make_loader",
]


def __getattr__(name):
    if name in ("DALILoader", "make_loader"):
        from . import dali

        return getattr(dali, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
