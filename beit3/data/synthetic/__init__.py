"""The embedded synthetic world: a demo and test world of coloured shapes, written in the public
raw formats of the BEiT-3 tasks (see ``world.py`` for the layout on disk). The demo's cached
assets built from it are the jobs' (``beit3.jobs.demo_assets``).

    scenes.py       shapes, colours, sizes; sampling a scene
    render.py       drawing a scene
    language.py     captions, VQA questions and answers, NLVR2 statements, a corpus
    world.py        the world on disk (images, annotations, corpus, SentencePiece model, shards)
"""
from beit3.data.synthetic.language import NLVR2_STATEMENTS, nlvr2_candidates
from beit3.data.synthetic.scenes import CLASSES, COLORS, SHAPES, Scene, Shape
from beit3.data.synthetic.world import WORLD_VERSION, WorldConfig, make_synthetic_world, split_sizes, write_nlvr2

__all__ = ["CLASSES", "COLORS", "NLVR2_STATEMENTS", "SHAPES", "Scene", "Shape", "WORLD_VERSION",
           "WorldConfig", "make_synthetic_world", "nlvr2_candidates", "split_sizes", "write_nlvr2"]
