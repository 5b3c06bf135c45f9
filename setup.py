"""Build of cpvt_kernels and its extension cpvt_kernels._C.

Build switches (environment variables, printed when the build starts):
  CPVT_BUILD_CUDA   1: build the CUDA kernels (fails without a usable toolkit); 0: skip them;
                    unset: build them when torch is a CUDA build and a CUDA toolkit of the
                    same major version as torch's is found (torch's build refuses another).
  CUDA_HOME         the CUDA toolkit root (the folder holding bin/nvcc); when unset, CUDA_PATH,
                    else found from the nvcc on the PATH or /usr/local/cuda*.
  TORCH_CUDA_ARCH_LIST  GPU architectures for nvcc (default here: "8.0;9.0").
  CPVT_BUILD_CPU    1 (default): build the CPU kernels; 0: leave them out (a quicker build for
                    a GPU machine that only checks the CUDA and Triton backends: the cpu backend
                    is then unavailable).
  CPVT_CPU_ARCH     native (default): compile the CPU kernels for this machine's vector units;
                    x86-64-v2, x86-64-v3 (AVX2), x86-64-v4 (AVX-512): for every x86-64 CPU of
                    that level or later; generic: the compiler's default (any CPU).
                    The build records the instruction sets it may use, and the package does
                    not load it on a CPU that lacks one (rather than die on an illegal
                    instruction).
  CPVT_DEBUG        1: build with -O0 -g.
  MAX_JOBS          parallel compile jobs (ninja).
"""
import glob
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """The toolkit root, looking through an nvcc that is a wrapper script."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.insert(0, m.group(1).decode())
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in candidates:
        libs = glob.glob(os.path.join(root, "lib64", "libcudart.so*")) + glob.glob(
            os.path.join(root, "targets", "*", "lib", "libcudart.so*"))
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and libs:
            return root
    return None


# The variable that named the toolkit root, if one did (rather than the search).
_cuda_home_var = next((v for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)), None)
_cuda_home = _real_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension is imported)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_flag(name):
    """The switch in the environment variable ``name``: None where it is unset or empty, else
    True or False; any other value stops the build with a message naming the variable (a typo
    must not quietly leave kernels out)."""
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    v = v.strip().lower()
    if v not in _TRUE + _FALSE:
        sys.exit(f"cpvt_kernels build: {name} must be 1 or 0 (or one of {_TRUE + _FALSE}), "
                 f"got {os.environ[name]!r}")
    return v in _TRUE


def _toolkit_version(root):
    """The CUDA toolkit's version as ``nvcc --version`` prints it ("13.0"), or None."""
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _toolkit_problem():
    """Why the toolkit cannot compile against this torch, or None: a root given by CUDA_HOME or
    CUDA_PATH without an nvcc, or a toolkit of another major CUDA version than torch's own
    (torch's build refuses 12.x against 13.x)."""
    nvcc = os.path.join(_cuda_home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        where = f"{_cuda_home_var} is" if _cuda_home_var else "the toolkit found is"
        return (f"{where} {_cuda_home}, which has no {os.path.join('bin', 'nvcc')}: set "
                f"CUDA_HOME to the root of a CUDA toolkit (the folder that holds bin/nvcc)")
    found = _toolkit_version(_cuda_home)
    if found is None or found.split(".")[0] == torch.version.cuda.split(".")[0]:
        return None
    return (f"the CUDA toolkit at {_cuda_home} is CUDA {found} and torch {torch.__version__} "
            f"was built with CUDA {torch.version.cuda}; torch's build needs the same major "
            f"version: set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or "
            f"install a torch built for CUDA {found.split('.')[0]}")


CPU_ARCHES = ("native", "generic", "x86-64-v2", "x86-64-v3", "x86-64-v4")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# The compiler's macros for the x86 instruction-set extensions it may emit from plain C++
# (vector, bit-manipulation and conversion instructions; x86-64's SSE and SSE2 are in every
# such CPU), and the names Linux gives them in /proc/cpuinfo.
_ISA_MACROS = {
    "SSE3": "pni", "SSSE3": "ssse3", "SSE4_1": "sse4_1", "SSE4_2": "sse4_2", "POPCNT": "popcnt",
    "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI": "bmi1", "BMI2": "bmi2",
    "LZCNT": "abm", "MOVBE": "movbe", "SSE4A": "sse4a", "TBM": "tbm", "FMA4": "fma4",
    "XOP": "xop", "AVXVNNI": "avx_vnni",
    "AVX512F": "avx512f", "AVX512CD": "avx512cd", "AVX512BW": "avx512bw",
    "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl", "AVX512IFMA": "avx512ifma",
    "AVX512VBMI": "avx512vbmi", "AVX512VBMI2": "avx512_vbmi2", "AVX512VNNI": "avx512_vnni",
    "AVX512BITALG": "avx512_bitalg", "AVX512VPOPCNTDQ": "avx512_vpopcntdq",
    "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16", "AMX_TILE": "amx_tile",
    "AVX512VP2INTERSECT": "avx512_vp2intersect", "AMX_BF16": "amx_bf16", "AMX_INT8": "amx_int8",
}


def _cpu_features(arch):
    """The CPU features (as /proc/cpuinfo names them) that the CPU kernels compiled for ``arch``
    may use, from the compiler's predefined macros; None where that is not known (not x86, or
    the compiler could not be asked)."""
    if not _X86:
        return None
    cxx = shlex.split(os.environ.get("CXX") or "c++")
    march = [] if arch == "generic" else [f"-march={arch}"]
    try:
        out = subprocess.run(cxx + march + ["-dM", "-E", "-x", "c++", os.devnull],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    macros = set(re.findall(r"^#define __(\w+)__ 1$", out.stdout, re.M))
    features = {flag for macro, flag in _ISA_MACROS.items() if macro in macros}
    if arch == "native":
        # Only what this machine's /proc/cpuinfo shows, which is what the package checks
        # against (the same reader): some kernels leave a flag out of it, and the build would
        # then refuse the very machine it was made on.
        shown = _package_cpu_flags()
        if shown is not None:
            features &= shown
    return tuple(sorted(features))


def _package_cpu_flags():
    """cpvt_kernels._cpuinfo.cpu_flags(), loaded by path: the package itself needs torch and
    its built extension."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpvt_kernels", "_cpuinfo.py")
    spec = importlib.util.spec_from_file_location("_cpvt_kernels_cpuinfo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_flags()


def _build_config():
    want = _env_flag("CPVT_BUILD_CUDA")
    has_toolkit = _cuda_home is not None
    torch_cuda = torch.version.cuda is not None
    problem = _toolkit_problem() if has_toolkit and torch_cuda and want is not False else None
    if want is None:
        cuda = has_toolkit and torch_cuda and problem is None
        why = "auto: " + ("torch CUDA build and toolkit found" if cuda else
                          ("no CUDA toolkit found" if not has_toolkit else
                           "torch is a CPU build" if not torch_cuda else problem))
    else:
        cuda = want
        why = "CPVT_BUILD_CUDA=" + os.environ["CPVT_BUILD_CUDA"]
        if cuda and not (has_toolkit and torch_cuda and problem is None):
            sys.exit("cpvt_kernels build: CPVT_BUILD_CUDA=1 but "
                     + ("no CUDA toolkit was found (set CUDA_HOME)" if not has_toolkit
                        else "torch is a CPU build" if not torch_cuda else problem))
    arch = os.environ.get("CPVT_CPU_ARCH", "native").strip().lower()
    if arch not in CPU_ARCHES:
        sys.exit(f"cpvt_kernels build: CPVT_CPU_ARCH must be one of {', '.join(CPU_ARCHES)}, "
                 f"got {arch!r}")
    if arch.startswith("x86-64-") and not _X86:
        sys.exit(f"cpvt_kernels build: CPVT_CPU_ARCH={arch} is for x86-64 CPUs, and this is "
                 f"{platform.machine()}: use native or generic")
    cpu = _env_flag("CPVT_BUILD_CPU") is not False
    if not cpu and not cuda:
        sys.exit("cpvt_kernels build: CPVT_BUILD_CPU=0 needs the CUDA kernels (CPVT_BUILD_CUDA=1)")
    return cuda, why, arch, cpu


def _build_info_text(cuda, why, arch, cpu, features):
    return ('"""What cpvt_kernels._C was built against; written by setup.py, not tracked."""\n'
            f"TORCH_VERSION = {str(torch.__version__)!r}\n"
            f"TORCH_CUDA = {torch.version.cuda!r}\n"
            f"CUDA_KERNELS = {cuda!r}\n"
            f"CUDA_KERNELS_WHY = {why!r}\n"
            f"CPU_KERNELS = {cpu!r}\n"
            f"CPU_ARCH = {arch!r}\n"
            f"CPU_FEATURES = {features!r}\n")


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _recorded_torch(info):
    """The torch version a build record names, or None."""
    try:
        with open(info) as f:
            m = re.search(r"^TORCH_VERSION = '([^']*)'$", f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


class _BuildExtension(BuildExtension):
    """torch's BuildExtension, which also writes _build_info.py next to each extension it
    compiles: the torch it was built against (the package refuses to load the extension into
    another torch, and says to rebuild) and what it holds.

    setuptools compiles into the build folder and, for an in-place build, copies the extension
    into the source tree; the record is written beside the compiled file when the compile
    changed it, and copied with it. Commands that only read the metadata (pip's resolution,
    egg_info) write nothing, and an extension whose record names another torch is compiled
    again even where its sources are older than it (torch's ninja builds always compile)."""

    def build_extension(self, ext):
        path = self.get_ext_fullpath(ext.name)
        info = os.path.join(os.path.dirname(path), "_build_info.py")
        recorded = _recorded_torch(info)
        if recorded is not None and recorded != str(torch.__version__):
            self.force = True
        before = _mtime(path)
        super().build_extension(ext)
        if _mtime(path) not in (None, before):
            cuda, why, arch, cpu = _CONFIG
            features = _cpu_features(arch) if cpu else None
            with open(info, "w") as f:
                f.write(_build_info_text(cuda, why, arch, cpu, features))
            print(f"cpvt_kernels build: wrote {info} (torch {torch.__version__}"
                  + (f"; CPU kernels for {' '.join(features) or 'any x86-64 CPU'}"
                     if features is not None else "") + ")")

    def run(self):
        super().run()
        if not self.inplace:
            return
        for ext in self.extensions:
            inplace = self.get_ext_fullpath(ext.name)
            self.inplace = False
            built = self.get_ext_fullpath(ext.name)
            self.inplace = True
            src = os.path.join(os.path.dirname(built), "_build_info.py")
            dst = os.path.join(os.path.dirname(inplace), "_build_info.py")
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(dst):
                shutil.copyfile(src, dst)


class _BuildPy(build_py):
    """build_py without the source tree's build record (an in-place build's): the build folder
    keeps the record of the extension compiled there."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir)
                if (m[0], m[1]) != ("cpvt_kernels", "_build_info")]


_CONFIG = None  # (cuda, why, arch, cpu), set by _extensions


def _extensions():
    global _CONFIG
    cuda, why, arch, cpu = _build_config()
    _CONFIG = (cuda, why, arch, cpu)
    debug = _env_flag("CPVT_DEBUG") is True
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # Python's own CFLAGS carry -g, which doubles the compile time of the CPU kernels (338 s
    # against 698 s for the single file they were on a 2-core Zen 1) and the size of the
    # extension: -g0 drops it outside debug builds. at::parallel_for is OpenMP in torch's
    # builds; without -fopenmp it silently runs serially.
    cxx = opt + ([] if debug else ["-g0"]) + ["-fvisibility=hidden", "-fopenmp"]
    if cpu and arch != "generic":  # without the CPU kernels, nothing here needs it
        cxx.append(f"-march={arch}")
    sources = (["csrc/module.cpp", "csrc/peg.cpp", "csrc/autograd.cpp"]
               + (sorted(glob.glob("csrc/cpu/*.cpp")) if cpu else []))
    print("cpvt_kernels build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    print(f"  CUDA kernels: {'yes' if cuda else 'no'} ({why})")
    if cuda:
        print(f"  CUDA_HOME={_cuda_home}  TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    cpu_what = f"yes ({arch})" if cpu else f"no (CPVT_BUILD_CPU={os.environ['CPVT_BUILD_CPU']})"
    print(f"  CPU kernels: {cpu_what}   debug: {debug}   "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
    # A toolchain that links libstdc++ statically (seen with the GCC of a GPU machine's image)
    # leaves the extension's copy of it half bound to the copy torch loaded: formatting an
    # integer into an error message then printed nothing, or crashed. Hiding the symbols of
    # static libraries keeps such a copy whole; with a shared libstdc++ it changes nothing.
    link = ["-fopenmp"] + (["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else [])
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("cpvt_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                              extra_link_args=link, py_limited_api=False)]
    return [CppExtension("cpvt_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=link)]


setup(
    name="cpvt_kernels",
    packages=find_packages(include=["cpvt_kernels", "cpvt_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExtension, "build_py": _BuildPy},
)
