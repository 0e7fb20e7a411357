"""The launchers: the ``mnemos`` command line and ``mnemos up``.

They sit above the roles: they start the control plane, workers, gateway and registry, so
they import those packages, and nothing below imports them (the protocol package
:mod:`mnemos` imports no role, and no role imports the launchers).
"""

from launchers.cli import cli, main
from launchers.up import LocalStack, UpOptions, child_env, run_up

__all__ = ["cli", "main", "LocalStack", "UpOptions", "child_env", "run_up"]
