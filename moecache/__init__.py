"""moecache: trace-driven expert-cache simulation for Mixture-of-Experts models.

>>> import moecache as mc
>>> tr = mc.synth(layers=2, experts=16, top_k=2, tokens=100, seed=0)
>>> r = mc.replay(tr, policy="lru", capacity=4)
>>> 0 <= r.hit_rate <= 1
True
"""

from ._version import __version__
from .curve import curve
from .errors import MoecacheError, TraceError
from .python_policy import PythonPolicy
from .replay import Prefetch, replay
from .requests import Requests
from .results import ReplayResult
from .synth import synth
from .timeline import TimelineResult, timeline
from .trace import Trace

__all__ = [
    "MoecacheError",
    "Prefetch",
    "PythonPolicy",
    "ReplayResult",
    "Requests",
    "TimelineResult",
    "Trace",
    "TraceError",
    "__version__",
    "curve",
    "replay",
    "synth",
    "timeline",
]
