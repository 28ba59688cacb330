"""What the hardware reports over a logging interval: peak memory and, on NVIDIA GPUs, the energy counter."""

from __future__ import annotations

import psutil
import pynvml
import torch

from ..run.distributed import all_reduce_max

GIB = 2**30


def memory_gib(device: torch.device) -> dict[str, float]:
    """This process's resident memory, and on a GPU the peak memory torch allocated since the last call (GiB)."""
    row = {"cpu_rss_gib": psutil.Process().memory_info().rss / GIB}
    if device.type == "cuda":
        row["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    return row


class EnergyMeter:
    """Joules one NVIDIA GPU used, from NVML's total-energy counter (millijoules since the driver loaded).

    The counter covers the whole GPU, including other processes on it.
    """

    def __init__(self, handle):
        self.handle = handle
        self.last_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    @classmethod
    def for_device(cls, device: torch.device) -> EnergyMeter | None:
        """A meter for a CUDA device whose driver reports energy (Volta and newer); None anywhere else."""
        if device.type != "cuda":
            return None
        try:
            pynvml.nvmlInit()
            # By UUID, so that CUDA_VISIBLE_DEVICES renumbering cannot pick another GPU.
            uuid = torch.cuda.get_device_properties(device).uuid
            return cls(pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}"))
        except pynvml.NVMLError:  # no NVIDIA driver (e.g. ROCm), or a GPU without the counter
            return None

    def joules_since_last(self) -> float:
        now_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        joules, self.last_mj = (now_mj - self.last_mj) / 1000, now_mj
        return joules


class DeviceInterval:
    """A logging interval's energy (this rank's GPU, None off NVIDIA GPUs) and peak memory, for either trainer: the
    energy is summed over ranks with the trainer's other sums, the peaks take one max-reduce."""

    ENERGY, MEASURED = "device/energy_j", "device/ranks_measured"

    def __init__(self, device: torch.device):
        self.device = device
        self.energy = EnergyMeter.for_device(device)

    def sums(self) -> dict[str, torch.Tensor]:
        """[joules since the last call, 1 if this rank measured energy else 0], by name."""
        joules, measured = (self.energy.joules_since_last(), 1.0) if self.energy else (0.0, 0.0)
        return {self.ENERGY: torch.tensor(joules, dtype=torch.float64, device=self.device),
                self.MEASURED: torch.tensor(measured, dtype=torch.float64, device=self.device)}

    def metrics(self, summed: dict[str, torch.Tensor], tokens: float, world_size: int) -> dict:
        """``energy_j`` and ``joules_per_token`` when every rank measured energy (``tokens``: the interval's, all
        ranks), and the peak memory of the busiest rank (every rank must call it)."""
        row = {}
        joules, ranks_measured = float(summed[self.ENERGY]), float(summed[self.MEASURED])
        if ranks_measured == world_size:  # energy of every GPU, or none reported
            row.update(energy_j=joules, joules_per_token=joules / tokens)
        memory = memory_gib(self.device)
        peaks = all_reduce_max(torch.tensor(list(memory.values()), dtype=torch.float64, device=self.device))
        row.update(zip(memory, peaks.tolist()))
        return row
