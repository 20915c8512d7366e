"""The training side of the engine: one TrainWorker per rank (worker.py), its sharding (sharding.py),
batching and the loss contract (batching.py), checkpoints (checkpoint.py) and RNG state (rng.py)."""
from .batching import MODEL_INPUTS, Forward, LossFn, even_slices, loss_mask_of, num_rows, split_rows
from .rng import rng_state, set_rng_state
from .worker import ModelFactory, TrainWorker

__all__ = ["MODEL_INPUTS", "Forward", "LossFn", "ModelFactory", "TrainWorker", "even_slices", "loss_mask_of",
           "num_rows", "rng_state", "set_rng_state", "split_rows"]
