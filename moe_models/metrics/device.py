"""What the hardware reports: peak memory and, on NVIDIA GPUs, the energy counter."""

from __future__ import annotations

import psutil
import pynvml
import torch

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
