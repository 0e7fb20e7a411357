"""The autoscaler (``mnemos autoscaler``): pools of workers sized to their work.

- :mod:`.policy`: how many workers a pool should have (the rule, pure).
- :mod:`.service`: the process that watches the queues and workers and acts.
- :mod:`.lease`: one acting instance at a time.
- :mod:`.providers`: where workers come from (``local``, ``aws``); a new provider goes there.
"""

from control_plane.autoscaler.config import AutoscalerSettings
from control_plane.autoscaler.service import Autoscaler

__all__ = ["Autoscaler", "AutoscalerSettings"]
