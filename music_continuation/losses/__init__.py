"""Audio-space losses (RMS, multi-resolution STFT, log-mel), their weighted sum, and the gradient balancer.

    from music_continuation.losses import MultiResolutionSTFTLoss, MelSpectrogramLoss, CombinedLoss
"""
from music_continuation.losses.audio import (
    LOSS_COMPONENTS,
    LOSSES,
    CombinedLoss,
    LogMelLoss,
    LogSTFTMagnitudeLoss,
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    SpectralConvergenceLoss,
    STFTMagnitude,
    rms_loss,
)

__all__ = ["LOSSES", "LOSS_COMPONENTS", "CombinedLoss", "LogMelLoss", "LogSTFTMagnitudeLoss", "MelSpectrogramLoss",
           "MultiResolutionSTFTLoss", "STFTMagnitude", "SpectralConvergenceLoss", "rms_loss"]
