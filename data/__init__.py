"""
Datasets for samtok: the embedded synthetic shapes world (data.shapes) and the
on-disk folder format with its reader/writer (data.jsonl).

    from data import make_scene, iter_scenes, read_folder, write_folder
"""
from data.shapes import COLORS, SHAPES, SPLITS, iter_scenes, make_scene, matches, scene_seeds

_JSONL_NAMES = ("rle_encode", "rle_decode", "write_folder", "read_folder", "boxes_from_masks", "load_rgb")


def __getattr__(name):
    # data.jsonl is imported lazily (PEP 562): importing it here eagerly would make
    # `python -m data.jsonl` warn that the module was already imported before running.
    if name in _JSONL_NAMES:
        from data import jsonl
        return getattr(jsonl, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


__all__ = ["COLORS", "SHAPES", "SPLITS", "iter_scenes", "make_scene", "matches", "scene_seeds",
           *_JSONL_NAMES]
