"""The facts several jobs share (music_continuation/settings.py): one table of flag roles, one list of loss
components and of baselines, read by the launcher, the worker, the scoring and ablate.py alike."""
from __future__ import annotations

import subprocess
import sys

from music_continuation import settings
from music_continuation.ablation import ablate, report
from music_continuation.config import flag_actions
from music_continuation.evaluation import scoring
from music_continuation.losses import LOSSES
from music_continuation.training import launcher


def test_every_launcher_flag_has_exactly_one_role():
    flags = set(flag_actions(launcher.build_parser()))
    assert set(settings.FLAG_ROLES) == flags          # none missing, none left over (a dict holds one role each)
    assert set(settings.FLAG_ROLES.values()) <= set(settings.ROLES)
    assert all(settings.ROLES[role].ablate in ("cell", "study", "ablate") for role in settings.FLAG_ROLES.values())
    assert all(settings.ROLES[role].resume in ("must match", "may change", None)
               for role in settings.FLAG_ROLES.values())


def test_the_launcher_and_ablate_read_their_rules_from_the_table():
    must = {("world_size" if f == "nproc" else f) for f, r in settings.FLAG_ROLES.items()
            if settings.ROLES[r].resume == "must match"}
    assert set(launcher.RESUME_MUST_MATCH) == must and "world_size" in must and "logger" in must
    assert set(launcher.RESUME_MAY_CHANGE) == {"epochs", "data_dir", "encodec_weights", "num_workers", "compile",
                                               "decoder_checkpointing", "log_audio_every", "references_dir",
                                               "musical_every", "beat_tracker", "stuck_timeout"}
    assert not set(launcher.RESUME_MUST_MATCH) & set(launcher.RESUME_MAY_CHANGE)
    assert set(ablate.RESERVED) == {f for f, r in settings.FLAG_ROLES.items() if settings.ROLES[r].ablate == "ablate"}
    assert set(ablate.STUDY_ONLY) == {"data_dir", "encodec_weights", "references_dir", "mlflow_tracking_uri",
                                      "experiment_name"}
    # a cell's identity: what changes the result, never where it is written or logged
    assert {"lr", "seed", "epochs", "nproc", "loss_weight_mel"} <= ablate.IDENTITY
    assert not {"checkpoint_dir", "run_name", "num_workers", "compile", "config"} & ablate.IDENTITY


def test_losses_and_baselines_have_one_source():
    assert settings.LOSSES is LOSSES
    assert settings.LOSS_WEIGHT_FLAGS == tuple(component.flag[2:] for component in LOSSES)
    assert report.BASELINES is scoring.BASELINES and report.LOSS_COMPONENTS is scoring.LOSS_COMPONENTS


def test_settings_and_ablate_start_without_torch():
    code = ("import sys; import music_continuation.ablation.ablate, music_continuation.config; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
