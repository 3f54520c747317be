"""The backend manager, one job a module.

- `registry`: the models dir (model YAML), re-read when it changes
- `admission`: a model's concurrency slots and queue, and a request's lease
- `instance`: one backend and what is known about it
- `process`: spawning, health-waiting, loading and stopping backend processes
- `placement`: where a model's replicas run (local processes, static addresses); `ray_placer`:
  on a Ray cluster (the `ray` extra)
- `supervisor`: process exits and the periodic look at every backend
- `budget`: the machine's cores and memory for models (physical cores, cgroups, overrides)
- `modelfiles` and `footprint`: a model's memory, estimated from its files, then measured
- `memory`: which load may proceed, LRU eviction, refusing what never fits
- `cpu`: dividing the cores among the backends computing at each moment
- `manager`: `BackendManager`, which composes them
"""

from gateway.manager.admission import Lease
from gateway.manager.instance import BackendInstance, State
from gateway.manager.manager import BackendManager
from gateway.manager.process import load_request_for
from gateway.manager.registry import ModelRegistry

__all__ = [
    "BackendInstance",
    "BackendManager",
    "Lease",
    "ModelRegistry",
    "State",
    "load_request_for",
]
