"""Data: synthetic scenes (procedural, streamed) and real image-text folders / tar shards."""

from glmimage.data.folder import ImageTextFolder, WebDatasetShards
from glmimage.data.scenes import (
    EDIT_KINDS, Scene, SceneObject, SceneStream, Word, apply_edit, caption, label_map, parse_caption,
    parse_edit, render, sample_edit, sample_scene,
)

__all__ = [
    "EDIT_KINDS", "ImageTextFolder", "Scene", "SceneObject", "SceneStream", "WebDatasetShards", "Word",
    "apply_edit", "caption", "label_map", "parse_caption", "parse_edit", "render", "sample_edit", "sample_scene",
]
