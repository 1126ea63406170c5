"""Training: the loop (:mod:`.loop`), one optimisation step (:mod:`.step`), the optimiser and schedule
(:mod:`.optim`) and torchrun / DDP (:mod:`.distributed`)."""

from .loop import TrainConfig, evaluate, load_trained_model, train

__all__ = ["TrainConfig", "evaluate", "load_trained_model", "train"]
