"""Mining AI-generated images from text-to-image APIs into shards (`fakecifar mine`).

    from fakecifar.mine import MineConfig, Miner
    with Miner(MineConfig(api="craiyon", out_dir=Path("raw"), per_class=100,
                          classes=["cat", "dog"])) as miner:
        report = miner.run().check()

Modules: `adapters` (one class per API protocol, registry `ADAPTERS`), `pacing` (token
bucket, AIMD, backoff, Retry-After), `transport` (one capped HTTP request), `phash`
(perceptual hash), `state` (locks, quota and claims shared through the output folder; read
its docstring for how several miners share one folder), `miner` (threads and shards).
"""

from .adapters import ADAPTERS, Adapter, ApiError, ApiOptions, Secret, adapter_class, register
from .miner import DEFAULT_PROMPT, MineConfig, MineInterrupted, Miner, MineReport, check_config
from .state import MinerBusyError, MineState

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ApiError",
    "ApiOptions",
    "DEFAULT_PROMPT",
    "MineConfig",
    "MineInterrupted",
    "MineReport",
    "MineState",
    "Miner",
    "MinerBusyError",
    "Secret",
    "adapter_class",
    "check_config",
    "register",
]
