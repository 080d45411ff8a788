"""Which machine a table came from: CPU model, cores, memory, load, accelerator, versions."""
import os
import platform


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def describe_machine(device):
    """A dict of what the numbers depend on; `device` is "cpu" or "cuda"."""
    import deepspeed
    import torch
    import transformers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
               "memory_gib": round(memory_gib(), 1), "load_average": os.getloadavg(),
               "device": device, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "transformers": transformers.__version__, "python": platform.python_version()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["gpu_count"] = torch.cuda.device_count()
    return machine


def machine_line(machine):
    """One line for a results file."""
    accelerator = (f"{machine['gpu']} (x{machine['gpu_count']})" if "gpu" in machine
                   else "no GPU")
    load = ", ".join(f"{x:.1f}" for x in machine["load_average"])
    return (f"{machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
            f"{machine['memory_gib']} GiB, {accelerator}; torch {machine['torch']}, deepspeed "
            f"{machine['deepspeed']}, transformers {machine['transformers']}; load average at "
            f"start {load}")
