"""Find the GPU and the CUDA libraries that onnxruntime-gpu needs, without importing torch.

onnxruntime-gpu links against CUDA and cuDNN but ships neither; they come from the nvidia-* pip
packages. Those lay their libraries out as ``site-packages/nvidia/<package>/lib/lib*.so.*``
(CUDA 13 gathers the toolkit into ``nvidia/cu13/lib``, cuDNN stays in ``nvidia/cudnn/lib``), a
directory the dynamic loader never searches. Loading them by full path with RTLD_GLOBAL puts
their sonames in the process, so onnxruntime's own ``dlopen("libcublas.so.13")`` finds them.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Iterable, Sequence

# Library name stems that the CUDA execution provider needs (linked or dlopened at run time).
CUDA_LIBRARIES = ("cudart", "cublasLt", "cublas", "curand", "cufft", "nvrtc", "nvJitLink", "cudnn")


def cuda_device_count() -> int:
    """Return how many CUDA devices the NVIDIA driver reports: 0 without a driver or a GPU.

    Asks the driver API (libcuda) directly; it costs a millisecond where there is no driver,
    so `--device auto` does not load gigabytes of CUDA libraries on a machine without a GPU.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


_SITE_NAMES = ("site-packages", "dist-packages")  # where pip installs; Debian's Python says dist-packages


def site_package_dirs() -> list[str]:
    """Return the directories that pip installs packages into, and only those.

    The interpreter's own (``site.getsitepackages()``), the user's when Python uses it, and
    the ``sys.path`` entries that are real site-packages or dist-packages directories (a
    ``PYTHONPATH`` pointing at one). Never the current directory: an empty or relative
    ``sys.path`` entry (``python -m`` puts the working directory first) is skipped, so a file
    planted there is never loaded into the process.
    """
    import site  # already imported at start-up, unless python -S

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += [p for p in sys.path if os.path.isabs(p) and os.path.basename(os.path.normpath(p)) in _SITE_NAMES]
    unique = dict.fromkeys(os.path.realpath(d) for d in dirs)  # an ordered set
    return [d for d in unique if os.path.isdir(d)]


def nvidia_library_dirs(search_path: Iterable[str] | None = None) -> list[str]:
    """Return every ``nvidia/*/lib`` directory under the entries of ``search_path``.

    Args:
        search_path: Directories to look in; None takes `site_package_dirs`. Empty and relative
            entries are skipped: they would mean the current directory.
    """
    dirs: list[str] = []
    for entry in site_package_dirs() if search_path is None else search_path:
        if entry and os.path.isabs(entry):
            dirs.extend(sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib"))))
    return [d for d in dirs if os.path.isdir(d)]


def candidate_libraries(lib_dirs: Sequence[str], stems: Sequence[str] = CUDA_LIBRARIES) -> list[str]:
    """Return the paths of the shared libraries in ``lib_dirs`` that belong to ``stems``.

    ``cudnn`` matches ``libcudnn.so.9`` and all its sub-libraries (``libcudnn_ops.so.9``...),
    which cuDNN itself dlopens by soname. Only versioned sonames (``lib*.so.N``) are taken.
    """
    found: list[str] = []
    for lib_dir in lib_dirs:
        for path in sorted(glob.glob(os.path.join(lib_dir, "lib*.so.*"))):
            base = os.path.basename(path).split(".so.")[0][3:]  # "libcudnn_ops.so.9" -> "cudnn_ops"
            if any(base == stem or (stem == "cudnn" and base.startswith("cudnn_")) for stem in stems):
                found.append(path)
    return found


def preload_cuda_libraries(search_path: Iterable[str] | None = None) -> list[str]:
    """Load the CUDA and cuDNN libraries of the nvidia-* pip packages into the process.

    Libraries depend on each other (cublas on cublasLt, cuDNN's parts on one another) and a
    library loads only once its dependencies have, so the list is retried until a round loads
    nothing new; the order of the files on disk does not matter.

    Args:
        search_path: Directories holding ``nvidia/*/lib`` (see `nvidia_library_dirs`).

    Returns:
        The paths loaded (empty where no nvidia-* package is installed: then the system's
        loader path must provide them).
    """
    pending = candidate_libraries(nvidia_library_dirs(search_path))
    loaded: list[str] = []
    while pending:
        failed = []
        for path in pending:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded.append(path)
            except OSError:
                failed.append(path)
        if len(failed) == len(pending):
            break  # the rest need something absent (e.g. cuFile); the provider may not need them
        pending = failed
    return loaded
