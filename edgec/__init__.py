"""edgec — an edge-deployment compiler for machine-learning models.

Layout (one import namespace; see ../shared/DESIGN.md for the map):

- ``edgec.search`` (folder ``search/``): search spaces, supernet, training, strategies, Pareto fronts.
- ``edgec.compile`` (``compile/``): ONNX export, parity, quantization recipes, packaging.
- ``edgec.targets`` (``targets/``): the ``Target`` interface, registry and the targets (``cpu-ort``,
  ``npu-qnn-htp``, ``cpu-openvino``, ``npu-openvino``), each measuring in a worker process.
- the core (``edgec/``): CLI, config, datasets, the pipeline that chains the stages (``pipeline`` for
  the built-in supernet, ``onnx_input`` for a user's ONNX model), reports.

Imports run one way: the core imports the stages; each stage imports only its own
modules and the leaf module :mod:`edgec.errors`, never the core or another stage
(the candidate → compile → measure loop lives in :mod:`edgec.pipeline`).
"""

__version__ = "0.1.0"
