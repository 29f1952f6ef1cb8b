"""One generation on several processes (torchrun), applied to unchanged networks from outside.

- :mod:`wan.parallel.groups`: the launch, the checks named before any model loads, the process
  group and its ``(cfg, sp)`` mesh, rank 0's request for everyone (:func:`parallel_session`);
- :mod:`wan.parallel.ulysses`: Ulysses sequence parallelism for the DiT, an attachment for
  ``wan.engine.attach`` (:class:`UlyssesParallel`);
- :mod:`wan.parallel.cfg`: the prompt and negative-prompt passes on different ranks
  (:class:`CfgParallel`);
- :mod:`wan.parallel.fsdp`: FSDP2 sharding of the DiT and umT5 blocks (:func:`shard_dit`,
  :func:`shard_text_encoder`);
- :mod:`wan.parallel.comm`: the counted collectives; :mod:`wan.parallel.perf_model`: what they
  should cost.

Heavy parts (FSDP) are imported by their modules on use. The engine composes them for a whole
generation: ``Engine.generate(request, parallel=ParallelConfig(...))`` in every process, which
``torchrun ... wgp.py generate --ulysses_size N [--cfg_parallel] [--dit_fsdp] [--t5_fsdp]`` does.
"""

from wan.parallel.cfg import CfgParallel, assign_passes
from wan.parallel.comm import CommCounter
from wan.parallel.groups import (Launch, ParallelConfig, ParallelConfigError, ParallelState, SharedCancel,
                                 broadcast_object, check_parallel, close_parallel, init_parallel, parallel_session)
from wan.parallel.ulysses import UlyssesParallel, ulysses_attention

__all__ = [
    "CfgParallel", "CommCounter", "Launch", "ParallelConfig", "ParallelConfigError", "ParallelState",
    "SharedCancel", "UlyssesParallel", "assign_passes", "broadcast_object", "check_parallel", "close_parallel",
    "init_parallel", "parallel_session", "ulysses_attention",
]
