"""nudiff-diffusion: the one diffusion core of nudiff (schedules, losses, samplers, UNet)."""

from ._arrays import images_to_tensor, structures_to_tensor, tensor_to_images, tensor_to_structures
from ._checkpoint import load_model, read_config, save_model
from ._config import PRESETS, UNetConfig
from ._guidance import GuidedRuntime, guided, mix_guidance
from ._losses import discretized_gaussian_log_likelihood, normal_kl, training_losses, vlb_terms
from ._onnx import (
    MIN_OPSET,
    PARITY_TOLERANCE,
    GraphRuntime,
    OnnxDenoiser,
    check_batch,
    check_export_folder,
    export_graph,
    export_onnx,
    making_parents,
    onnx_session,
    providers_for,
    read_graph_config,
    write_graph_config,
)
from ._resume import check_resume_settings, read_train_state, refuse_train_state
from ._runs import (
    add_device_argument,
    add_evaluate_arguments,
    add_sampling_arguments,
    add_train_arguments,
    initial_noise,
    median_seconds,
    report_evaluation,
    run_cli,
    runtime_options_from_args,
    shard_indices,
    train_config_from_args,
)
from ._runtime import (
    ENGINE_SUFFIXES,
    PRECISIONS,
    TorchDenoiser,
    check_runtime_options,
    load_denoiser,
    resolve_device,
    warn_if_emulated_precision,
)
from ._sampling import EpsFn, gaussian_eps_fn, sample, sampling_timesteps
from ._schedule import NoiseSchedule, space_timesteps
from ._tensorrt import EngineUnavailableError, TensorRTDenoiser, build_engine, check_engine_args, require_tensorrt
from ._trainer import TrainConfig, latest_checkpoint, setup_distributed, train
from ._unet import GroupNorm32, UNet, timestep_embedding

__version__ = "0.1.0"

__all__ = [
    "check_resume_settings",
    "read_train_state",
    "refuse_train_state",
    "add_evaluate_arguments",
    "median_seconds",
    "report_evaluation",
    "OnnxDenoiser",
    "MIN_OPSET",
    "PARITY_TOLERANCE",
    "GraphRuntime",
    "GuidedRuntime",
    "TensorRTDenoiser",
    "EngineUnavailableError",
    "ENGINE_SUFFIXES",
    "build_engine",
    "check_batch",
    "check_export_folder",
    "check_engine_args",
    "export_graph",
    "export_onnx",
    "making_parents",
    "mix_guidance",
    "onnx_session",
    "providers_for",
    "require_tensorrt",
    "write_graph_config",
    "read_graph_config",
    "add_sampling_arguments",
    "add_device_argument",
    "runtime_options_from_args",
    "add_train_arguments",
    "initial_noise",
    "run_cli",
    "shard_indices",
    "train_config_from_args",
    "images_to_tensor",
    "structures_to_tensor",
    "tensor_to_images",
    "tensor_to_structures",
    "PRESETS",
    "TorchDenoiser",
    "PRECISIONS",
    "check_runtime_options",
    "load_denoiser",
    "resolve_device",
    "warn_if_emulated_precision",
    "TrainConfig",
    "latest_checkpoint",
    "setup_distributed",
    "train",
    "GroupNorm32",
    "UNet",
    "UNetConfig",
    "load_model",
    "read_config",
    "save_model",
    "timestep_embedding",
    "EpsFn",
    "NoiseSchedule",
    "discretized_gaussian_log_likelihood",
    "gaussian_eps_fn",
    "guided",
    "normal_kl",
    "sample",
    "sampling_timesteps",
    "space_timesteps",
    "training_losses",
    "vlb_terms",
]
