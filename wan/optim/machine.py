"""Detects the memory of this machine for the planner: RAM through psutil, the GPU's memory,
name and compute capability through torch.cuda when CUDA is available."""

from __future__ import annotations

from wan.optim.planner import Machine


def detect_ram_bytes() -> int:
    """Total RAM in bytes (as the OS reports it: a 32 GB machine shows a little less)."""
    import psutil
    return int(psutil.virtual_memory().total)


def detect_gpu(index: int = 0) -> tuple[int, str, tuple[int, int]] | None:
    """(total memory in bytes, name, compute capability) of CUDA device ``index``, or None
    without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    return int(props.total_memory), str(props.name), (int(props.major), int(props.minor))


def detect_machine(index: int = 0) -> Machine:
    """This machine: its RAM, and CUDA device ``index`` if there is one."""
    gpu = detect_gpu(index)
    if gpu is None:
        return Machine(ram_bytes=detect_ram_bytes())
    vram, name, capability = gpu
    return Machine(ram_bytes=detect_ram_bytes(), vram_bytes=vram, gpu_name=name, gpu_capability=capability)
