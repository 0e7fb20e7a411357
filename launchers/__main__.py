"""``python -m launchers ...``: the ``mnemos`` command (how ``mnemos up`` starts its children)."""

from launchers.cli import main

main()
