"""The machine's own limits, measured in the same run as each benchmark.

- matmul peak: best-of-N time of an n x n matmul in fp32 and bf16 (2 n^3 FLOP each);
- memory bandwidth: best-of-N time of copying a large tensor (read + write bytes);
- a description of the machine (CPU model, cores, threads, GPU) for BENCHMARKS.md.

Run alone: python bench/machine.py
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_size(device) -> int:
    """Matrix size for the peak: 2048 on a CPU (larger gains nothing there), 8192 on a GPU (2048 is
    too small to fill an H100's tensor cores)."""
    return 8192 if torch.device(device).type == "cuda" else 2048


def matmul_peak(dtype: torch.dtype, device=None, n: int = 2048, repeats: int = 10) -> float:
    """Best achieved FLOP/s of an n x n @ n x n matmul."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def copy_bandwidth(device=None, mbytes: int = 512, repeats: int = 8) -> float:
    """Best achieved bytes/s of a tensor copy (counts bytes read + bytes written)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux VmHWM; unlike ru_maxrss it is not inherited
    from the parent process across fork + exec; ru_maxrss where /proc is missing)."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case_in_child(script: str, spec: dict) -> dict:
    """Run one benchmark case in a fresh process (``script --_case JSON``) and return the JSON line
    it prints last; a failing case stops the benchmark with its stderr."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, script, "--_case", json.dumps(spec)], capture_output=True,
                       text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"case {spec} failed (exit {r.returncode})")
    return json.loads(lines[-1])


def describe() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = []
    try:
        with open("/proc/cpuinfo") as fh:
            have = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
        flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in have]
    except OSError:
        flags = []
    # the CPU's name alone does not tell (an Intel Xeon with AMX and an AMD EPYC without differ
    # 2.5x)
    if flags:
        cpu = f"{cpu} [{' '.join(flags)}]"
    d = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "torch": torch.__version__, "python": platform.python_version(),
         "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return d


def measure(device=None, quick: bool = False) -> dict:
    """Machine description plus peaks (n x n matmuls, n = peak_size) and copy bandwidth; quick uses
    smaller sizes (for smoke tests)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = 1024 if quick else peak_size(device)
    out = describe()
    out["peak_matmul_n"] = n
    out["peak_fp32_flops"] = matmul_peak(torch.float32, device, n=n, repeats=3 if quick else 10)
    out["peak_bf16_flops"] = matmul_peak(torch.bfloat16, device, n=n, repeats=3 if quick else 10)
    out["copy_bandwidth_bytes"] = copy_bandwidth(device, mbytes=64 if quick else 512, repeats=3
                                                 if quick else 8)
    return out


def summary_line(m: dict) -> str:
    return (f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
            + (f", GPU {m['gpu']}" if "gpu" in m else "")
            + f" | peak ({m.get('peak_matmul_n', 2048)}^2 matmul) fp32 "
              f"{m['peak_fp32_flops'] / 1e12:.2f} TFLOP/s, bf16 {m['peak_bf16_flops'] / 1e12:.2f} "
              f"TFLOP/s, copy {m['copy_bandwidth_bytes'] / 1e9:.1f} GB/s | {m['date']}")


if __name__ == "__main__":
    m = measure()
    print(summary_line(m))
    print(json.dumps(m, indent=1))


def save_json(path, obj) -> None:
    """A benchmark's results as JSON at ``path`` (its folder made if missing)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


def read_folder_once(folder) -> None:
    """Read every file of ``folder`` once, so that a timed load that follows reads the page cache (a
    process cold start, not a disk benchmark)."""
    from pathlib import Path

    for f in Path(folder).glob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    continue
