"""The shared training loop: entry scripts configure it with a Recipe (what is trained) and TrainingParts."""

from library.engine.config import EngineConfig
from library.engine.loop import TrainResult, train
from library.engine.parts import LossInputs, SampleRequest, TrainingParts
from library.engine.recipe import ParamGroups, Recipe
from library.engine.step import TrainingDiverged

__all__ = [
    "EngineConfig",
    "LossInputs",
    "ParamGroups",
    "Recipe",
    "SampleRequest",
    "TrainResult",
    "TrainingDiverged",
    "TrainingParts",
    "train",
]
