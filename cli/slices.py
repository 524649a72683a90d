"""Cloud TPU slices: how many chips, how many hosts, how much HBM, which runtime.

Slice names follow Cloud TPU's accelerator types. Sources (checked 2026-11):
- v5e (``v5litepod-N``, N counts chips): https://cloud.google.com/tpu/docs/v5e —
  16 GiB HBM per chip; VMs hold 1, 4 or 8 chips; single-host serving up to 8 chips.
- v5p (``v5p-N``, N counts TensorCores, 2 per chip): https://cloud.google.com/tpu/docs/v5p —
  95 GiB HBM per chip; topology 2x2x1 = 8 cores = 4 chips = 1 host, 2x2x2 = 16 cores
  = 8 chips = 2 hosts (4 chips per host).
- v6e (``v6e-N``, N counts chips): https://cloud.google.com/tpu/docs/v6e — 32 GiB HBM
  per chip; a single host holds up to 8 chips.
- Multi-host v5e and v6e slices are made of 4-chip VMs (ct5lp-hightpu-4t,
  ct6e-standard-4t), e.g. v6e-16 = 4 hosts x 4 chips: the ``vms_per_slice`` table of
  github.com/AI-Hypercomputer/xpk (src/xpk/core/system_characteristics.py).
- Runtime (software) versions for JAX: https://cloud.google.com/tpu/docs/runtimes —
  v6e ``v2-alpha-tpuv6e``, v5p ``v2-alpha-tpuv5``, v5e ``v2-alpha-tpuv5-lite``.
  (SkyPilot 0.14.1 would default v5e to ``v2-alpha-tpuv5``, so we always set it.)
- SkyPilot treats every TPU whose name does not end in ``-8`` as a pod and runs
  ``setup``/``run`` on each of its hosts (sky/clouds/utils/gcp_utils.py is_tpu_vm_pod).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Generation:
    name: str  # as in slice names: "v5litepod", "v5p", "v6e"
    hbm_gib_per_chip: float
    runtime_version: str
    cores_per_chip: int  # what the number in the slice name counts (v5p counts cores)
    max_single_host_chips: int  # a slice up to this size is one VM
    chips_per_host_multi: int  # chips per VM in multi-host slices
    sizes: tuple[int, ...]  # the N in NAME-N that Cloud TPU offers (and we list)


GENERATIONS = {
    g.name: g for g in (
        Generation("v5litepod", 16, "v2-alpha-tpuv5-lite", 1, 8, 4, (1, 4, 8, 16, 32, 64, 128, 256)),
        Generation("v5p", 95, "v2-alpha-tpuv5", 2, 4, 4, (8, 16, 32, 64, 128, 256, 512)),
        Generation("v6e", 32, "v2-alpha-tpuv6e", 1, 8, 4, (1, 4, 8, 16, 32, 64, 128, 256)),
    )
}
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}

# The slices tests and `sgljax up --help` walk through: every size a model in recipes/
# might sensibly use. Larger sizes in Generation.sizes still parse.
CATALOGUE = (
    "v5litepod-1", "v5litepod-4", "v5litepod-8", "v5litepod-16", "v5litepod-32", "v5litepod-64",
    "v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128",
    "v6e-1", "v6e-4", "v6e-8", "v6e-16", "v6e-32", "v6e-64",
)


class SliceError(ValueError):
    """An unknown or malformed slice name."""


@dataclass(frozen=True)
class Slice:
    name: str  # "v6e-16"
    generation: str  # "v6e"
    chips: int
    hosts: int
    hbm_gib_per_chip: float
    runtime_version: str

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def accelerator(self) -> str:
        """SkyPilot's accelerator name."""
        return f"tpu-{self.name}"

    @property
    def is_local(self) -> bool:
        return self.generation == "local"

    def describe(self) -> str:
        hosts = "1 host" if self.hosts == 1 else f"{self.hosts} hosts x {self.chips_per_host} chips"
        return (f"{self.name}: {self.chips} chip{'s' * (self.chips > 1)} ({hosts}), "
                f"{self.hbm_gib_per_chip:g} GiB HBM per chip")


def parse_slice(text: str) -> Slice:
    """``v6e-16`` / ``tpu-v6e-16`` / ``v5e-8`` → a Slice, or SliceError with the choices."""
    name = text.strip().lower().removeprefix("tpu-")
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if not m:
        raise SliceError(f"unknown slice {text!r}; try one of: {', '.join(CATALOGUE)}")
    gen_name, size = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    gen = GENERATIONS.get(gen_name)
    if gen is None:
        raise SliceError(f"unknown TPU generation {m.group(1)!r} in {text!r}; "
                         f"sgljax knows {', '.join(GENERATIONS)} (v5e is v5litepod)")
    if size not in gen.sizes:
        raise SliceError(f"{gen_name} slices come in sizes {', '.join(map(str, gen.sizes))}, "
                         f"not {size}")
    chips = size // gen.cores_per_chip
    hosts = 1 if chips <= gen.max_single_host_chips else chips // gen.chips_per_host_multi
    return Slice(f"{gen_name}-{size}", gen_name, chips, hosts, gen.hbm_gib_per_chip,
                 gen.runtime_version)


def local_slice(devices_per_host: int = 1, hosts: int = 1, memory_gib: float | None = None) -> Slice:
    """This machine (or several processes on it, for tests) as a slice.

    ``memory_gib`` is the memory one device may use; by default the host RAM that is
    available now, split over the devices (CPU devices share it).
    """
    if memory_gib is None:
        import psutil

        memory_gib = psutil.virtual_memory().available / GIB / max(devices_per_host, 1)
    return Slice("local", "local", devices_per_host * hosts, hosts, round(memory_gib, 1), "")


def catalogue() -> list[Slice]:
    return [parse_slice(n) for n in CATALOGUE]
