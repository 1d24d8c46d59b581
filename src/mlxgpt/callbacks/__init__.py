"""Callbacks registered from conf/callbacks/ (Hydra instantiate)."""
from mlxgpt.callbacks.base import Callback
from mlxgpt.callbacks.checkpoint import CheckpointCallback
from mlxgpt.callbacks.early_stopping import EarlyStoppingCallback
from mlxgpt.callbacks.evaluation import EvaluationCallback
from mlxgpt.callbacks.metrics import MetricsFileCallback
from mlxgpt.callbacks.progress import ProgressCallback
from mlxgpt.callbacks.sample import SampleCallback
from mlxgpt.callbacks.throughput import ThroughputCallback

__all__ = ["Callback", "CheckpointCallback", "EarlyStoppingCallback", "EvaluationCallback", "MetricsFileCallback",
           "ProgressCallback", "SampleCallback", "ThroughputCallback"]
