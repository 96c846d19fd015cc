"""Build of d2g_fast and its compiled extension d2g_fast._C (ahead of time, never on first call).

Environment:
  D2G_NO_CUDA=1        build the CPU kernels only, even where a toolkit is found
  D2G_FORCE_CUDA=1     build the CUDA kernels even without a visible GPU (needs a toolkit)
  D2G_CUDA_ARCHS       e.g. "9.0" or "8.0;9.0+PTX" (default: the visible GPU, else 8.0;9.0+PTX)
  CUDA_HOME            the toolkit folder (default: found from nvcc, then /usr/local/cuda)
  MAX_JOBS             parallel compile jobs (default: bounded by cores and memory)
  D2G_DEBUG=1          -O0 -g, for debuggers and sanitizers
  D2G_SKIP_EXT=1       install the Python package only (the Makefile then builds the extension
                       in place with `setup.py build_ext --inplace`, incrementally, in build/)

The kernels are compiled against the torch that is installed, so install with
``pip install --no-build-isolation .``: an isolated build would compile them against whatever
torch pip fetches into its temporary environment, and an extension built for another torch
does not load (C++ ABI). pyproject.toml therefore does not list torch as a build requirement,
and this file stops with the instructions when torch cannot be imported. Next to the extension
the build writes its record (d2g_fast/_build_record.py: the torch it was compiled against),
which d2g_fast/_ext.py compares with the running torch at import.
"""
from __future__ import annotations

import glob
import os
import runpy
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and \
        os.path.isfile(os.path.join(path, "bin", "nvcc"))


def find_cuda_home() -> str | None:
    """The real toolkit folder. An `nvcc` on the PATH may be a wrapper script (as on our CI
    machines, /usr/local/bin/nvcc), whose folder holds no headers or libraries."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: look for the path it executes
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for token in head.split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 8.0


def default_jobs(with_cuda: bool) -> int:
    per_job_gib = 4.0 if with_cuda else 2.0  # nvcc on torch headers peaks around 3-4 GiB
    return max(1, min(os.cpu_count() or 1, int(memory_gib() // per_job_gib)))


cuda_home = find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

NO_TORCH_MESSAGE = """
d2g_fast compiles its kernels against the torch you run, and torch cannot be imported here.
If you ran `pip install .` (an isolated build, which hides your torch), install with:

    pip install torch                          # first, the torch you will use
    pip install --no-build-isolation .         # builds against it

(D2G_NO_CUDA=1 builds the CPU kernels only.)
"""

try:
    import torch  # noqa: E402
    from torch.utils import cpp_extension  # noqa: E402
except ImportError as exc:
    sys.exit(f"{NO_TORCH_MESSAGE}\n(import torch failed: {exc})")


def package_file(name: str) -> dict:
    """The globals of d2g_fast/<name>.py, run on its own: importing the package needs the
    extension this file builds."""
    return runpy.run_path(os.path.join(ROOT, "d2g_fast", f"{name}.py"))


def package_version() -> str:
    return package_file("_version")["__version__"]


def cuda_archs() -> str:
    if os.environ.get("D2G_CUDA_ARCHS"):
        return os.environ["D2G_CUDA_ARCHS"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return "8.0;9.0+PTX"


def want_cuda() -> tuple[bool, str]:
    if _flag("D2G_NO_CUDA"):
        return False, "D2G_NO_CUDA=1"
    if torch.version.cuda is None:
        if _flag("D2G_FORCE_CUDA"):
            sys.exit("D2G_FORCE_CUDA=1 but this torch is a CPU-only build (torch.version.cuda is None)")
        return False, "torch is a CPU-only build"
    if cuda_home is None:
        if _flag("D2G_FORCE_CUDA"):
            sys.exit("D2G_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False, "no CUDA toolkit found"
    return True, f"toolkit {cuda_home}"


def extra_cuda_includes() -> list[str]:
    """Some toolkits (ours on CI) ship without the cuBLAS/cuSPARSE headers that
    ATen/cuda/CUDAContext.h includes; the nvidia-* wheels torch depends on carry them."""
    if cuda_home is None or os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import site
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13/include", "nvidia/cusparse/include"):
            path = os.path.join(base, sub)
            if os.path.isfile(os.path.join(path, "cusparse.h")):
                return [path]
    return []


def sources(with_cuda: bool) -> list[str]:
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True)) if with_cuda else []
    return cpp + cu


def extensions():
    with_cuda, why = want_cuda()
    debug = _flag("D2G_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -g0: Python's own CFLAGS carry -g, which makes the library five times larger for no use in a release.
    cxx = opt + ([] if debug else ["-g0"]) + ["-fopenmp", "-fvisibility=hidden"]
    define_macros = []
    archs = ""
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp"]
    if with_cuda:
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define_macros.append(("D2G_WITH_CUDA", None))
    define_macros.append(("D2G_CUDA_ARCHS", f'"{archs}"'))
    os.environ.setdefault("MAX_JOBS", str(default_jobs(with_cuda)))
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = cls(
        name="d2g_fast._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc")] + (extra_cuda_includes() if with_cuda else []),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    print("=" * 72)
    print("d2g_fast build configuration")
    print(f"  torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels     {'yes' if with_cuda else 'no'} ({why})")
    print(f"  CUDA archs       {archs or '-'}")
    print(f"  CUDA_HOME        {cuda_home or '-'}")
    print(f"  MAX_JOBS         {os.environ['MAX_JOBS']} (cores {os.cpu_count()}, "
          f"memory {memory_gib():.0f} GiB)")
    print(f"  optimisation     {' '.join(opt)}")
    print(f"  sources          {len(ext.sources)} files")
    print("=" * 72)
    return [ext]


def build_record() -> dict:
    """What the extension is compiled against; the import refuses an extension whose torch
    differs from the running one."""
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "d2g_fast": package_version()}


class BuildExt(cpp_extension.BuildExtension):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_ninja", True)
        super().__init__(*args, **kwargs)

    def run(self):
        super().run()
        write_record = package_file("_build_record")["write"]
        for ext in self.extensions:
            write_record(os.path.dirname(self.get_ext_fullpath(ext.name)), build_record())


setup(
    name="d2g_fast",
    version=package_version(),
    description="Distil diffusion models into one-step conditional GANs (Diffusion2GAN), fast.",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["d2g_fast", "d2g_fast.*"]),
    package_data={"d2g_fast": ["assets/*", "toy/weights/*.json", "toy/weights/*.safetensors",
                               "toy/weights/teacher/*.json", "toy/weights/teacher/*/*"]},
    ext_modules=[] if _flag("D2G_SKIP_EXT") else extensions(),
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "diffusers": ["diffusers>=0.30", "transformers>=4.40", "peft"],
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.30", "transformers>=4.40", "peft"],
        # Comparison targets for parity tests and benchmarks (never imported by the package).
        "compare": ["elatentlpips==0.2", "lpips==0.1.4", "setuptools<81"],
        "bench": ["diffusers>=0.30", "transformers>=4.40", "lpips==0.1.4", "matplotlib"],
    },
    entry_points={"console_scripts": ["d2g=d2g_fast.cli:main"]},
    zip_safe=False,
)
