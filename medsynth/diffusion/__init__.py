"""Diffusion maths apart from the model: schedulers (diffusers), training objectives, guidance."""

from medsynth.diffusion.guidance import classifier_free_guidance, forget_sequence, sample_condition_dropout
from medsynth.diffusion.objectives import (LESION_CLASSES_ENTRY, EpsilonPrediction, LossOutput, Objective,
                                           RectifiedFlow, VPrediction, bucket_losses, check_region_weighting,
                                           expand_region_classes, make_objective, region_label_values,
                                           region_weights)
from medsynth.diffusion.schedulers import OBJECTIVES, SAMPLERS, default_sampler, make_scheduler

__all__ = ["make_scheduler", "default_sampler", "OBJECTIVES", "SAMPLERS", "make_objective", "Objective",
           "RectifiedFlow", "EpsilonPrediction", "VPrediction", "LossOutput", "bucket_losses",
           "region_weights", "region_label_values", "check_region_weighting", "expand_region_classes",
           "LESION_CLASSES_ENTRY",
           "classifier_free_guidance", "forget_sequence", "sample_condition_dropout"]
