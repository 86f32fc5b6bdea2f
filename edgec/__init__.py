"""edgec — an edge-deployment compiler for machine-learning models.

Layout (one import namespace; see ../shared/DESIGN.md for the map):

- ``edgec.search`` (folder ``search/``): search spaces, supernet, training, strategies, Pareto fronts.
- ``edgec.compile`` (``compile/``): ONNX export, parity, quantization recipes, packaging.
- ``edgec.targets`` (``targets/``): the ``Target`` interface, registry and ``cpu-ort``.
- the core (``edgec/``): CLI, config, datasets, the pipeline that chains the stages, reports.

Imports run one way: the core imports the stages; each stage imports only its own
modules and the leaf module :mod:`edgec.errors`, never the core or another stage
(the candidate → compile → measure loop lives in :mod:`edgec.pipeline`).
"""

__version__ = "0.1.0"
