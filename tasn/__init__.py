"""TASN (Trilinear Attention Sampling Network, CVPR 2019) in PyTorch, with its MLOps pipeline.

Heavy dependencies (mlflow, kfp, dvc, great-expectations) are imported lazily by the modules that
need them, so `tasn.model`, `tasn.ops` and the benchmarks import with torch alone.
"""

__version__ = "0.1.0"
