"""nudiff-diffusion: the one diffusion core of nudiff (schedules, losses, samplers)."""

from ._guidance import guided
from ._losses import discretized_gaussian_log_likelihood, normal_kl, training_losses, vlb_terms
from ._sampling import EpsFn, sample, sampling_timesteps
from ._schedule import NoiseSchedule, space_timesteps

__version__ = "0.1.0"

__all__ = [
    "EpsFn",
    "NoiseSchedule",
    "discretized_gaussian_log_likelihood",
    "guided",
    "normal_kl",
    "sample",
    "sampling_timesteps",
    "space_timesteps",
    "training_losses",
    "vlb_terms",
]
