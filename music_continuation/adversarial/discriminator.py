"""EnCodec's multi-scale STFT discriminator (MS-STFT-D), in AudioCraft's published configuration.

Each scale s looks at the complex STFT of the audio x [B, 1, N] (Hann window of n_fft samples, hop n_fft / 4,
no centring, normalised by the window's energy, sqrt(sum w^2)), its real and imaginary parts as 2 channels laid
out [B, 2, frames, bins], through dilated 2-D convolutions (time first, frequency second):

    conv  2 -> F, kernel (3, 9)                                            + LeakyReLU(0.3)   feature map 1
    conv  F -> F, kernel (3, 9), stride (1, 2), dilation (d, 1)            + LeakyReLU(0.3)   maps 2-4 (d = 1, 2, 4)
    conv  F -> F, kernel (3, 3)                                            + LeakyReLU(0.3)   feature map 5
    conv  F -> 1, kernel (3, 3)                                            logits [B, 1, frames, bins']

F = 32 filters; every convolution but the first is weight-normalised; the paddings keep the frames, the
strides halve the bins three times: bins' = ceil(ceil(ceil((n_fft / 2 + 1) / 2) / 2) / 2). Scales:
n_fft 1024, 2048, 512, 256, 128 (AudioCraft `config/solver/compression/default.yaml`, `msstftd`).

The STFT always runs in float32 (autocast off): bf16 FFTs are not accurate enough, and the convolutions
after it may run under autocast.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from music_continuation.codec import SAMPLE_RATE

N_FFTS = (1024, 2048, 512, 256, 128)
FILTERS = 32
KERNEL = (3, 9)           # (time, frequency)
STRIDE = (1, 2)
DILATIONS = (1, 2, 4)     # on the time axis
NEGATIVE_SLOPE = 0.3
SHORTEST_SECONDS = max(N_FFTS) / SAMPLE_RATE     # the shortest audio the scales can hear (no centring)


def _padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """'Same' padding of a dilated kernel (odd sizes): the time axis keeps its length."""
    return ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)


class STFTDiscriminator(nn.Module):
    """One scale of the MS-STFT discriminator (module docstring): x [B, 1, N] -> (logits, [feature maps])."""

    def __init__(self, n_fft: int, hop_length: int | None = None, win_length: int | None = None,
                 filters: int = FILTERS, kernel: tuple[int, int] = KERNEL, stride: tuple[int, int] = STRIDE,
                 dilations: tuple[int, ...] = DILATIONS, negative_slope: float = NEGATIVE_SLOPE):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length or n_fft // 4
        self.win_length = win_length or n_fft
        window = torch.hann_window(self.win_length)
        self.register_buffer("window", window, persistent=False)
        self.scale = float(window.square().sum().sqrt())      # torchaudio's normalized=True ("window")
        layers = [nn.Conv2d(2, filters, kernel, padding=_padding(kernel))]
        for dilation in dilations:
            layers.append(weight_norm(nn.Conv2d(filters, filters, kernel, stride=stride, dilation=(dilation, 1),
                                                padding=_padding(kernel, (dilation, 1)))))
        square = (kernel[0], kernel[0])
        layers.append(weight_norm(nn.Conv2d(filters, filters, square, padding=_padding(square))))
        self.convs = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(filters, 1, square, padding=_padding(square)))
        # in place on the convolution's output, which no backward needs: one map less per layer, and faster
        self.activation = nn.LeakyReLU(negative_slope, inplace=True)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, N] -> [B, 2, frames, n_fft // 2 + 1]: real and imaginary parts, float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(x.reshape(x.shape[0], -1).float(), self.n_fft, self.hop_length, self.win_length,
                              window=self.window, center=False, return_complex=True) / self.scale
        # channels-last, the layout D's parameters are kept in (adversary.py): no copy at every convolution
        return torch.view_as_real(spec).permute(0, 3, 2, 1).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.spectrogram(x)
        feature_maps = []
        for conv in self.convs:
            z = self.activation(conv(z))
            feature_maps.append(z)
        return self.post(z), feature_maps


class MultiScaleSTFTDiscriminator(nn.Module):
    """The scales side by side: x [B, 1, N] -> ([logits per scale], [[feature maps] per scale])."""

    def __init__(self, n_ffts: tuple[int, ...] = N_FFTS, filters: int = FILTERS):
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(n_fft, filters=filters) for n_fft in n_ffts)
        self.min_length = max(n_ffts)     # no centring: the largest FFT needs that many samples

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        if x.shape[-1] < self.min_length:
            raise ValueError(f"discriminator: audio {list(x.shape)} is shorter than its largest FFT "
                             f"({self.min_length} samples)")
        outputs = [scale(x) for scale in self.scales]
        return [logits for logits, _ in outputs], [maps for _, maps in outputs]
