"""Echo noise autoencoders with exact rates (Brekelmans et al. 2019) and the paper's baselines.

A plain PyTorch library: no Ray, MLflow or DVC here (those live in `pipeline/`).
"""
from .methods import METHODS, AEOutput, Autoencoder, build_model, method_options
from .noise import (clip_factor, echo_low_rate_limit, echo_noise, echo_rate, echo_sample,
                    truncation_error_bound)

__all__ = ["METHODS", "AEOutput", "Autoencoder", "build_model", "method_options", "clip_factor",
           "echo_low_rate_limit", "echo_noise", "echo_rate", "echo_sample",
           "truncation_error_bound"]
