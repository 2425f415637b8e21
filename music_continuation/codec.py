"""The EnCodec 24 kHz codec: the one place that loads it, fingerprints it, encodes and decodes.

Every other module takes its audio constants from here, so the sample rate, the hop
and the latent dimension exist exactly once in the code base.
"""
from __future__ import annotations

import hashlib
import urllib.error
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from music_continuation.utils import UserError, one_line

SAMPLE_RATE = 24_000              # Hz, mono
LATENT_DIM = 128                  # channels of the continuous encoder output
HOP_LENGTH = 320                  # audio samples per latent frame (product of the encoder strides)
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH   # 75 latent frames per second
CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"   # the name (and sha256 prefix) the encodec package uses
# Frames of audio before a chunk that the encoder is fed and whose latents are dropped: the encoder is causal
# but its LSTM carries state, and one second of warm-up makes a chunked encoding match a whole one.
ENCODER_CONTEXT_FRAMES = 75
RANDOM_CODEC_SEED = 20240601      # `--encodec_weights random` is this seed: identical in every process and run
WEIGHT_CHOICES_HELP = "'pretrained', 'random', or a path to a checkpoint file or a directory holding " + CHECKPOINT_NAME


class CodecLoadError(UserError, RuntimeError):
    """The requested EnCodec weights cannot be loaded (message is one line, meant for the user)."""


def _build_model():
    from encodec import EncodecModel
    with warnings.catch_warnings():     # encodec uses the deprecated weight_norm API; nothing to act on
        warnings.simplefilter("ignore", FutureWarning)
        return EncodecModel.encodec_model_24khz(pretrained=False)


@torch.no_grad()
def _condition_random_init(model: nn.Module) -> nn.Module:
    """Redraw the random codec's weights so that its outputs depend on its inputs.

    With PyTorch's default init (weight variance 1/(3 fan_in), random biases) every one of the
    encoder's and decoder's ~16 layers shrinks the signal while its bias adds a constant: the latents
    of two different songs then differ by ~1e-6 of their level, and the decoded audio hardly moves
    with the latents, so nothing can be learnt through it. Here every convolution weight is drawn
    N(0, 1 / fan_in) (fan_in of a transposed convolution: in_channels x kernel / stride, the taps
    that reach one output sample) and every bias is 0, so each layer roughly keeps the signal's
    scale: the latents carry the audio and the decoder's output follows the latents. It is still
    just a random codec; only the pretrained weights make a meaningful one.
    """
    from torch.nn.utils.weight_norm import WeightNorm
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            weight = module.weight_v
            if isinstance(module, nn.ConvTranspose1d):
                fan_in = weight.shape[0] * weight.shape[2] / module.stride[0]
            else:
                fan_in = weight.shape[1] * weight.shape[2]
            weight.normal_(0.0, fan_in ** -0.5)
            (norm_dim,) = [hook.dim for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]
            module.weight_g.copy_(torch.norm_except_dim(weight, 2, norm_dim))   # so that weight == weight_v
            module.bias.zero_()
        elif isinstance(module, nn.LSTM):
            for name, parameter in module.named_parameters():
                if name.startswith("bias"):
                    parameter.zero_()
    return model


def _load_state_dict(weights: str) -> dict:
    if weights == "pretrained":
        from encodec.model import ROOT_URL
        from encodec.utils import _get_checkpoint_url
        # torch hub caches the file under $TORCH_HOME/hub/checkpoints and only downloads it once.
        url = _get_checkpoint_url(ROOT_URL, CHECKPOINT_NAME)
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, progress=False)
        except (urllib.error.URLError, OSError) as error:
            raise CodecLoadError(
                f"cannot download the pretrained EnCodec weights ({error}); offline machines pass "
                f"--encodec_weights /path/to/{CHECKPOINT_NAME} (or its directory), or "
                f"--encodec_weights random for a randomly-initialised codec (demos and tests only)") from None
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CodecLoadError(f"--encodec_weights {weights!r}: no such file; expected {WEIGHT_CHOICES_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CodecLoadError(f"--encodec_weights {path}: not a readable torch checkpoint ({one_line(error)})") from None
    if not isinstance(state, dict):
        raise CodecLoadError(f"--encodec_weights {path}: expected a state dict, found {type(state).__name__}")
    return state


def load_codec(weights: str = "pretrained", device: str | torch.device = "cpu") -> nn.Module:
    """Return the EnCodec 24 kHz model in eval mode with every parameter frozen.

    `weights` is 'pretrained' (torch hub download/cache), 'random' (fixed seed) or a local path.
    Never falls back from one to another: a failure raises `CodecLoadError`.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_CODEC_SEED)
            model = _condition_random_init(_build_model())
    else:
        state = _load_state_dict(weights)
        model = _build_model()
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise CodecLoadError(f"--encodec_weights {weights}: not an EnCodec 24 kHz state dict "
                                 f"({one_line(error)})") from None
    model.requires_grad_(False)
    return model.eval().to(device)


def codec_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor in the codec's state dict: equal fingerprints mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_fingerprint(expected: str, actual: str, what: str) -> None:
    """Refuse to pair latents with a codec other than the one that produced them."""
    if expected != actual:
        raise CodecLoadError(
            f"{what} was made with EnCodec weights {expected}, but the loaded codec is {actual}: "
            f"latents from one codec decoded by another are garbage; pass the same --encodec_weights")


@torch.no_grad()
def encode(model: nn.Module, audio: torch.Tensor, chunk_seconds: float = 60.0,
           context_seconds: float = ENCODER_CONTEXT_FRAMES / FRAME_RATE) -> torch.Tensor:
    """Continuous encoder latents (before quantisation) of `audio` [B, 1, N] -> [B, 128, N // HOP_LENGTH].

    Long audio is encoded in chunks so memory stays bounded. The encoder is causal, so each chunk
    is fed `context_seconds` of the audio before it and the frames of that warm-up are dropped;
    audio shorter than one chunk is encoded in one pass and is exact.
    """
    frames = audio.shape[-1] // HOP_LENGTH
    audio = audio[..., : frames * HOP_LENGTH]
    chunk = int(chunk_seconds * FRAME_RATE)
    context = int(context_seconds * FRAME_RATE)
    parts = []
    for start in range(0, frames, chunk):
        left = max(0, start - context)
        stop = min(frames, start + chunk)
        latents = model.encoder(audio[..., left * HOP_LENGTH: stop * HOP_LENGTH])
        parts.append(latents[..., start - left:])
    return torch.cat(parts, dim=-1)


class FrozenDecoder(nn.Module):
    """The EnCodec decoder as a fixed, differentiable function: latents [B, 128, T] -> audio [B, 1, T*320].

    Its weights never change (no parameters require grad, so no weight gradients are computed),
    but gradients flow through it to the latents. Weight norm is folded into plain weights once,
    which gives the same output without recomputing w = g * v / ||v|| on every call.
    """

    def __init__(self, codec: nn.Module, checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.decoder = _build_model().decoder   # a copy: folding weight norm must not alter the codec
        self.decoder.load_state_dict(codec.decoder.state_dict())
        self.decoder.to(next(codec.parameters()).device)
        for module in self.decoder.modules():
            if hasattr(module, "weight_g"):
                torch.nn.utils.remove_weight_norm(module)
        self.decoder.requires_grad_(False)
        # cuDNN's LSTM can only backpropagate in training mode. The decoder has no dropout and no
        # batch norm, so training mode computes exactly what eval mode does: keep it there always.
        super().train(True)

    def train(self, mode: bool = True) -> "FrozenDecoder":
        return self  # see __init__: the mode makes no numerical difference and cuDNN needs train mode

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if not (self.checkpointing and torch.is_grad_enabled() and latents.requires_grad):
            return self.decoder(latents)
        # Activation checkpointing, one example at a time: the forward keeps no activations and the
        # backward recomputes one example's at once, so the decoder's activation memory drops from the
        # whole batch's to a single example's, for the price of one extra decoder forward.
        return torch.cat([checkpoint(self.decoder, item, use_reentrant=False) for item in latents.split(1)])
