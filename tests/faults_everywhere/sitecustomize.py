"""TEST_FAULTS (tests/fault_launcher.py) in every Python process that imports the training worker, for launchers
the tests do not start themselves: ablate.py's cells under Slurm and torchrun run
`-m music_continuation.training.launcher`, each rank a process of its own. fault_environment(..., everywhere=True)
puts this folder first on PYTHONPATH, so Python imports this file at start-up; it does nothing without TEST_FAULTS.
"""
import os
import sys

WORKER = "music_continuation.training.worker"


class _InstallAfterImport:
    """A meta-path finder for the worker alone: the normal spec, whose module gets the faults once executed."""

    def find_spec(self, name, path, target=None):
        if name != WORKER:
            return None
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            from tests.fault_launcher import FAULTS_VARIABLE, install, parse_faults
            install(parse_faults(os.environ.get(FAULTS_VARIABLE, "")))

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TEST_FAULTS"):
    sys.meta_path.insert(0, _InstallAfterImport())
