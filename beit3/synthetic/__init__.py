"""The embedded synthetic world: a demo and test world of coloured shapes, written in the public
raw formats of the BEiT-3 tasks, and the cached demo assets built from it (see ``world.py`` for
the layout on disk).

    scenes.py       shapes, colours, sizes; sampling a scene
    render.py       drawing a scene
    language.py     captions, VQA questions and answers, NLVR2 statements, a corpus
    world.py        the world on disk (images, annotations, corpus, SentencePiece model, shards)
    demo_assets.py  the world, its SentencePiece model and a tiny VQ-KD, built once and cached
"""
from .demo_assets import BuildStopped, DemoAssets, demo_assets, ensure_synthetic_world, finetune_world, synthetic_root
from .language import NLVR2_STATEMENTS, nlvr2_candidates
from .scenes import CLASSES, COLORS, SHAPES, Scene, Shape
from .world import WORLD_VERSION, WorldConfig, main, make_synthetic_world, split_sizes, write_nlvr2

__all__ = ["BuildStopped", "CLASSES", "COLORS", "DemoAssets", "NLVR2_STATEMENTS", "SHAPES", "Scene", "Shape", "WORLD_VERSION",
           "WorldConfig", "demo_assets", "ensure_synthetic_world", "finetune_world", "main", "make_synthetic_world",
           "nlvr2_candidates", "split_sizes", "synthetic_root", "write_nlvr2"]
