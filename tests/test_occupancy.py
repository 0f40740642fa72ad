"""slvit_fast.occupancy against hand-computed cases of the CUDA occupancy calculator's rules."""

import pytest

from slvit_fast.occupancy import occupancy


def test_register_limited_sm80():
    # 256 threads = 8 warps; 40 regs -> 1280 regs/warp (a multiple of 256); 16384 per sub-partition
    # // 1280 = 12 warps, x4 = 48 warps = 6 blocks. Warp slots allow 64 // 8 = 8, shared memory
    # (0 + 1 KB reserved) 164 KB // 1 KB = 164.
    r = occupancy("sm_80", 256, 40, 0)
    assert r["limits"] == {"warps": 8, "blocks": 32, "registers": 6, "shared_memory": 164}
    assert (r["blocks_per_sm"], r["warps_per_sm"], r["limiter"]) == (6, 48, "registers")
    assert r["occupancy"] == pytest.approx(0.75)


def test_register_allocation_granularity():
    # 33 regs x 32 = 1056 -> rounded up to 1280 (unit 256): same as 40 regs, not 1056
    assert occupancy(80, 256, 33)["regs_per_warp"] == 1280
    assert occupancy(80, 256, 33)["blocks_per_sm"] == 6
    # 32 regs -> exactly 1024: 16 warps per sub-partition = 64 warps = 8 blocks (warp slots bind too)
    r = occupancy(80, 256, 32)
    assert r["limits"]["registers"] == 8 and r["blocks_per_sm"] == 8 and r["limiter"] == "warps"


def test_shared_memory_and_registers_sm90_optin():
    # 4 warps, 128 regs -> 4096 regs/warp, 4 warps per sub-partition = 16 warps = 4 blocks;
    # 50 KB dynamic (opted in) + 1 KB reserved = 52224 B; 228 KB // 52224 = 4 (4.47)
    r = occupancy("sm_90", 128, 128, 50 * 1024, smem_optin=True)
    assert r["limits"]["registers"] == 4 and r["limits"]["shared_memory"] == 4
    assert r["smem_per_block_allocated"] == 52224
    assert (r["blocks_per_sm"], r["warps_per_sm"]) == (4, 16)
    assert r["occupancy"] == pytest.approx(0.25)
    # the same on sm_80 (164 KB per SM): 167936 // 52224 = 3 blocks, shared memory binds
    r80 = occupancy("sm_80", 128, 128, 50 * 1024, smem_optin=True)
    assert (r80["blocks_per_sm"], r80["limiter"]) == (3, "shared_memory")


def test_shared_memory_rounding_and_48k_limit():
    # 17 KB + 1 KB reserved = 18432 B (already a multiple of 128): sm_80 167936 // 18432 = 9
    assert occupancy(80, 64, 16, 17 * 1024)["limits"]["shared_memory"] == 9
    # 100 B + 1024 = 1124 -> 1152 (unit 128)
    assert occupancy(90, 64, 16, 100)["smem_per_block_allocated"] == 1152
    # more than 48 KB without opting in cannot launch; with opt-in it can (up to 163 KB on sm_80)
    assert occupancy(80, 128, 32, 49 * 1024)["blocks_per_sm"] == 0
    assert occupancy(80, 128, 32, 49 * 1024, smem_optin=True)["blocks_per_sm"] == 3  # 167936 // 51200
    assert occupancy(80, 128, 32, 164 * 1024, smem_optin=True)["blocks_per_sm"] == 0
    assert occupancy(90, 128, 32, 200 * 1024, smem_optin=True)["blocks_per_sm"] == 1


def test_block_slot_limit_and_too_many_registers():
    # one warp of 16 regs: registers would allow 128 blocks, warp slots 64; 32 blocks per SM at most
    r = occupancy("sm_90", 32, 16)
    assert (r["blocks_per_sm"], r["warps_per_sm"], r["limiter"]) == (32, 32, "blocks")
    assert r["occupancy"] == pytest.approx(0.5)
    # 1024 threads x 255 regs: 8192 regs/warp x 32 warps > 64K registers per block -> no launch
    assert occupancy(80, 1024, 255)["blocks_per_sm"] == 0
    # 96 threads (3 warps) at 168 regs: 5376/warp; software check 3 x 5376 fits, and 4 (rounded to
    # the sub-partitions) x 5376 = 21504 fits; 16384 // 5376 = 3 warps per sub-partition -> 12 // 3 = 4
    assert occupancy(80, 96, 168)["blocks_per_sm"] == 4
    assert occupancy(80, 1025, 16)["blocks_per_sm"] == 0  # more than 1024 threads per block


def test_bad_arguments():
    with pytest.raises(ValueError, match="sm_75"):
        occupancy("sm_75", 128, 32)
    with pytest.raises(ValueError, match="threads_per_block"):
        occupancy(80, 0, 32)
    with pytest.raises(ValueError, match="registers_per_thread"):
        occupancy(80, 128, -1)
