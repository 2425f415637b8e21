"""Melody: the notes of a continuation against the notes of the real one, as a transcriber hears them.

The transcriber is basic-pitch (Bittner et al., ICASSP 2022, Apache-2.0): a small polyphonic note model whose
ONNX file ships inside its wheel and runs with onnxruntime (CPU, or CUDA where onnxruntime-gpu is installed).
Audio [B, N] at 24 kHz is resampled to its 22.05 kHz and cut into its 2 s windows overlapping by 30 frames
(basic_pitch.inference.run_inference's framing), the windows of the whole batch go through the model together,
and per example come back the note posteriorgram P[t, n] and the onset posteriorgram (86.1 frames/s, 88 piano
keys A0..C8). Notes are decoded by basic_pitch.note_creation.output_to_notes_polyphonic with the thresholds of
basic_pitch.inference.predict (onset 0.5, frame 0.3, minimum note 127.7 ms, melodia trick).

    melody_f1               mir_eval.transcription.precision_recall_f1_overlap of the continuation's notes
                            against the reference's: a note matches when its onset is within ±50 ms and its
                            pitch within ±50 cents; offsets are ignored. 1 when neither has a note, 0 when
                            only one has.
    pitch_class_agreement   A[t, c] = (max over octaves of P[t, n] of pitch class c) >= 0.3 (the frame
                            threshold): the pitch classes sounding at frame t. Agreement is the Jaccard index
                            |A_out & A_ref| / |A_out | A_ref| over all (frame, pitch class) cells, which is
                            mir_eval.multipitch's frame Accuracy on the pitch-class sets. 1 when neither has
                            a sounding note, 0 when only one has.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

from music_continuation.codec import SAMPLE_RATE
from music_continuation.evaluation.listeners import packages

ONSET_TOLERANCE = 0.05        # seconds: mir_eval.transcription's published default
PITCH_TOLERANCE = 50.0        # cents: mir_eval.transcription's published default
ONSET_THRESHOLD = 0.5         # basic_pitch.inference.predict's defaults
FRAME_THRESHOLD = 0.3
MIN_NOTE_SECONDS = 0.1277
OVERLAP_FRAMES = 30           # basic_pitch.inference.run_inference: consecutive windows share 30 model frames
LOWEST_MIDI = 21              # posteriorgram bin 0 is A0
WINDOWS_PER_RUN = 32          # model windows (2 s each) per onnxruntime call: bounds its memory
OUTPUT_NAMES = ("StatefulPartitionedCall:1", "StatefulPartitionedCall:2")   # (note, onset) in the ONNX graph


@dataclass
class Transcription:
    """What the transcriber hears in one signal."""
    note: np.ndarray          # [T, 88] note posteriorgram, values in [0, 1]
    notes: list               # [(onset_s, offset_s, midi_pitch)], sorted


def midi_to_hz(midi) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=float) - 69.0) / 12.0)


class Transcriber:
    """basic-pitch's ONNX model in one onnxruntime session; `transcriber(audio [B, N])` -> [Transcription]."""

    def __init__(self, device="cpu"):
        package, self.constants, self.note_creation, onnxruntime = packages.basic_pitch()
        path = Path(package.__file__).parent / "saved_models" / "icassp_2022" / "nmp.onnx"
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3      # errors only: it warns about unused initialisers of the converted graph
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def _windows(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """run_inference's framing for every example: (windows [W, AUDIO_N_SAMPLES, 1], owner example [W])."""
        c = self.constants
        overlap = OVERLAP_FRAMES * c.FFT_HOP
        hop = c.AUDIO_N_SAMPLES - overlap
        windows, owners = [], []
        for example, signal in enumerate(signals):
            padded = np.concatenate([np.zeros(overlap // 2, np.float32), signal])
            for start in range(0, padded.shape[0], hop):
                window = padded[start: start + c.AUDIO_N_SAMPLES]
                windows.append(np.pad(window, (0, c.AUDIO_N_SAMPLES - window.shape[0])))
                owners.append(example)
        return np.stack(windows)[..., None].astype(np.float32), np.asarray(owners)

    def posteriorgrams(self, audio: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """audio [B, N] (or [B, 1, N]) at SAMPLE_RATE -> per example (note, onset) posteriorgrams [T, 88]."""
        c = self.constants
        audio = audio.detach().float().reshape(audio.shape[0], -1).cpu()
        signals = torchaudio.functional.resample(audio, SAMPLE_RATE, c.AUDIO_SAMPLE_RATE).numpy()
        windows, owners = self._windows(signals)
        runs = [self.session.run(list(OUTPUT_NAMES), {self.input_name: windows[first: first + WINDOWS_PER_RUN]})
                for first in range(0, len(windows), WINDOWS_PER_RUN)]
        trim = OVERLAP_FRAMES // 2        # unwrap_output: half the overlap off each end of every window
        note, onset = (np.concatenate([run[k] for run in runs])[:, trim:-trim] for k in range(2))
        frames = int(np.floor(signals.shape[1] * c.ANNOTATIONS_FPS / c.AUDIO_SAMPLE_RATE))
        return [(note[owners == example].reshape(-1, note.shape[-1])[:frames],
                 onset[owners == example].reshape(-1, onset.shape[-1])[:frames]) for example in range(len(signals))]

    def __call__(self, audio: torch.Tensor) -> list[Transcription]:
        """audio [B, N] at SAMPLE_RATE -> per example its posteriorgram and notes."""
        return [Transcription(note, self.decode_notes(note, onset)) for note, onset in self.posteriorgrams(audio)]

    def decode_notes(self, note: np.ndarray, onset: np.ndarray) -> list:
        """basic-pitch's note decoding (predict()'s thresholds) -> [(onset_s, offset_s, midi_pitch)]."""
        c, creation = self.constants, self.note_creation
        if note.shape[0] < 2:
            return []
        min_frames = int(np.round(MIN_NOTE_SECONDS * c.AUDIO_SAMPLE_RATE / c.FFT_HOP))
        with np.errstate(invalid="ignore", divide="ignore"):    # silence: its onset rescaling divides 0 by 0
            events = creation.output_to_notes_polyphonic(
                note.copy(), onset.copy(), onset_thresh=ONSET_THRESHOLD, frame_thresh=FRAME_THRESHOLD,
                min_note_len=min_frames, infer_onsets=True, max_freq=None, min_freq=None, melodia_trick=True)
        times = creation.model_frames_to_time(note.shape[0])
        return sorted((float(times[start]), float(times[end]), int(pitch)) for start, end, pitch, _ in events)



def melody_f1(estimated: list, reference: list) -> float:
    """Note-onset F-measure (mir_eval.transcription, ±50 ms, ±50 cents, no offsets) of two note lists."""
    if not reference and not estimated:
        return 1.0
    if not reference or not estimated:
        return 0.0
    mir_eval = packages.mir_eval()

    def arrays(notes):
        # mir_eval wants offset > onset; a note's offset is never scored here (offset_ratio None)
        intervals = np.array([[start, max(end, start + 1e-3)] for start, end, _ in notes])
        return intervals, midi_to_hz([pitch for *_, pitch in notes])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, f_measure, _ = mir_eval.transcription.precision_recall_f1_overlap(
            *arrays(reference), *arrays(estimated), onset_tolerance=ONSET_TOLERANCE,
            pitch_tolerance=PITCH_TOLERANCE, offset_ratio=None)
    return float(f_measure)


def pitch_classes(note: np.ndarray) -> np.ndarray:
    """[T, 88] note posteriorgram -> [T, 12] bool: some note of pitch class c (0 = C) is >= FRAME_THRESHOLD."""
    active = note >= FRAME_THRESHOLD
    folded = np.zeros((note.shape[0], 12), dtype=bool)
    for key in range(note.shape[1]):
        folded[:, (key + LOWEST_MIDI) % 12] |= active[:, key]
    return folded


def pitch_class_agreement(note_a: np.ndarray, note_b: np.ndarray) -> float:
    """Jaccard index of the sounding (frame, pitch class) cells of two posteriorgrams (module docstring)."""
    frames = min(note_a.shape[0], note_b.shape[0])
    a, b = pitch_classes(note_a[:frames]), pitch_classes(note_b[:frames])
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
