"""Theoretical occupancy of a kernel on sm_80 / sm_90: resident blocks and warps per SM.

This is the CUDA occupancy calculator's computation, as implemented by the toolkit header
``cuda_occupancy.h`` (``cudaOccMaxActiveBlocksPerMultiprocessor``; the same rules as the
``CUDA_Occupancy_Calculator.xls`` sheet and ``cudaOccupancyMaxActiveBlocksPerMultiprocessor``). Resident
blocks per SM are the minimum of four limits:

* **warps**: ``floor(max_warps_per_sm / ceil(threads / 32))`` (``cudaOccMaxBlocksPerSMWarpsLimit``);
  0 if ``threads > 1024``.
* **blocks**: the per-arch maximum of resident blocks per SM (``cudaOccMaxBlocksPerMultiprocessor``:
  32 on sm_80 and sm_90).
* **registers** (``cudaOccMaxBlocksPerSMRegsLimit``): registers are allocated per warp,
  ``ceil(regs_per_thread * 32 / 256) * 256`` (allocation unit 256, ``cudaOccRegAllocationGranularity``),
  out of each of the 4 sub-partitions' 16K registers: ``warps_per_sm = 4 * floor(16384 / regs_per_warp)``,
  blocks = ``floor(warps_per_sm / warps_per_block)``. 0 if ``regs_per_thread > 255`` (the per-thread
  maximum; ``cudaOccRegAllocationMaxPerThread`` says 256, but ptxas never assigns more than 255) or if
  the block's registers, with its warps rounded up to a multiple of 4 (the hardware check), exceed
  64K.
* **shared memory** (``cudaOccMaxBlocksPerSMSmemLimit``): per block ``static + dynamic + 1 KB``
  (the driver's reserved shared memory per block since Ampere) rounded up to 128 bytes
  (``cudaOccSMemAllocationGranularity``); it must not exceed the per-block limit (48 KB unless the
  kernel opts in, then 163 KB on sm_80 / 227 KB on sm_90, plus the reserved 1 KB). The SM's shared
  memory is the carveout: with the default carveout preference the full 164 KB (sm_80) / 228 KB
  (sm_90) (``cudaOccSMemPreferenceVoltaPlus``). blocks = ``floor(smem_per_sm / smem_per_block)``.

Not modelled: the barrier limit (one named barrier per block, never binding here: 2 per resident
block are available on sm_80/sm_90), partitioned global caching (not on these arches) and clusters.
Device properties are those of the A100 (sm_80, GA100) and H100 (sm_90, GH100); consumer sm_86/sm_89
parts have fewer warps and less shared memory per SM and are not described here.
"""

from __future__ import annotations

from dataclasses import dataclass

WARP_SIZE = 32


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one architecture (values of ``cudaDeviceProp`` / ``cuda_occupancy.h``)."""

    name: str
    max_threads_per_sm: int
    max_blocks_per_sm: int
    max_threads_per_block: int
    regs_per_sm: int
    regs_per_block: int
    reg_alloc_unit: int  # registers, per warp
    max_regs_per_thread: int
    sub_partitions: int
    smem_per_sm: int  # bytes, the largest carveout (used under the default carveout preference)
    smem_per_block: int  # bytes, without opt-in
    smem_per_block_optin: int  # bytes, with cudaFuncAttributeMaxDynamicSharedMemorySize
    smem_reserved_per_block: int  # bytes the driver adds to every block (Ampere and later)
    smem_alloc_unit: int  # bytes

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // WARP_SIZE


ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits("sm_80", max_threads_per_sm=2048, max_blocks_per_sm=32, max_threads_per_block=1024,
                        regs_per_sm=65536, regs_per_block=65536, reg_alloc_unit=256, max_regs_per_thread=255,
                        sub_partitions=4, smem_per_sm=164 * 1024, smem_per_block=48 * 1024,
                        smem_per_block_optin=163 * 1024, smem_reserved_per_block=1024, smem_alloc_unit=128),
    "sm_90": ArchLimits("sm_90", max_threads_per_sm=2048, max_blocks_per_sm=32, max_threads_per_block=1024,
                        regs_per_sm=65536, regs_per_block=65536, reg_alloc_unit=256, max_regs_per_thread=255,
                        sub_partitions=4, smem_per_sm=228 * 1024, smem_per_block=48 * 1024,
                        smem_per_block_optin=227 * 1024, smem_reserved_per_block=1024, smem_alloc_unit=128),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def arch_limits(arch: str | int) -> ArchLimits:
    key = arch if isinstance(arch, str) else f"sm_{arch}"
    if key not in ARCH_LIMITS:
        raise ValueError(f"no occupancy limits for arch {arch!r}; known: {sorted(ARCH_LIMITS)}")
    return ARCH_LIMITS[key]


def occupancy(arch: str | int, threads_per_block: int, registers_per_thread: int, shared_bytes: int = 0,
              *, smem_optin: bool = False) -> dict:
    """Theoretical occupancy of one kernel launch on ``arch`` (``"sm_80"``, ``"sm_90"`` or 80 / 90).

    ``shared_bytes`` is the block's static + dynamic shared memory; ``smem_optin`` says the kernel raised
    its dynamic shared memory limit above 48 KB (Triton does so when it needs more). Returns
    ``{"blocks_per_sm", "warps_per_sm", "occupancy" (warps / max warps), "limiter", "limits": {...}}``
    where ``limiter`` names the binding limit (``"warps"``, ``"blocks"``, ``"registers"``,
    ``"shared_memory"``); blocks_per_sm 0 means the kernel cannot launch with these resources.
    """
    lim = arch_limits(arch)
    for name, value in (("threads_per_block", threads_per_block), ("registers_per_thread", registers_per_thread),
                        ("shared_bytes", shared_bytes)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if threads_per_block < 1:
        raise ValueError(f"threads_per_block must be >= 1, got {threads_per_block}")
    warps_per_block = -(-threads_per_block // WARP_SIZE)

    # warps limit
    by_warps = 0 if threads_per_block > lim.max_threads_per_block else lim.max_warps_per_sm // warps_per_block

    # registers limit: allocated per warp in units of 256, per sub-partition
    regs_per_warp = _round_up(registers_per_thread * WARP_SIZE, lim.reg_alloc_unit)
    regs_block = regs_per_warp * warps_per_block
    regs_block_hw = regs_per_warp * _round_up(warps_per_block, lim.sub_partitions)
    if registers_per_thread > lim.max_regs_per_thread or regs_block > lim.regs_per_block \
            or regs_block_hw > lim.regs_per_block:
        by_regs = 0
    elif regs_per_warp == 0:
        by_regs = lim.max_blocks_per_sm
    else:
        warps_per_partition = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        by_regs = warps_per_partition * lim.sub_partitions // warps_per_block

    # shared memory limit (default carveout preference = the largest carveout)
    smem_block = _round_up(shared_bytes + lim.smem_reserved_per_block, lim.smem_alloc_unit)
    per_block_limit = (lim.smem_per_block_optin if smem_optin and shared_bytes > lim.smem_per_block
                       else lim.smem_per_block) + lim.smem_reserved_per_block
    by_smem = 0 if smem_block > per_block_limit else lim.smem_per_sm // smem_block

    limits = {"warps": by_warps, "blocks": lim.max_blocks_per_sm, "registers": by_regs, "shared_memory": by_smem}
    blocks = min(limits.values())
    # the binding limit; ties name the hardware block/warp slot limits first (they cannot be tuned away)
    limiter = next(k for k in ("warps", "blocks", "registers", "shared_memory") if limits[k] == blocks)
    warps = blocks * warps_per_block
    return {"arch": lim.name, "threads_per_block": threads_per_block, "blocks_per_sm": blocks,
            "warps_per_sm": warps, "occupancy": warps / lim.max_warps_per_sm, "limiter": limiter,
            "limits": limits, "regs_per_warp": regs_per_warp, "smem_per_block_allocated": smem_block}


__all__ = ["ARCH_LIMITS", "ArchLimits", "arch_limits", "occupancy"]
