"""Test setup: CPU only, 8 emulated devices; set before jax is imported anywhere.

``gpu``-marked tests run their checks in a fresh interpreter with the caller's own environment (this
process is pinned to CPU), and are skipped, with the reason printed by ``-ra``, where jax has no
GPU backend. ``-m gpu`` selects only them; ``-m "not gpu"`` leaves them out.

Programs compile with little optimization (jax's ``jax_disable_most_optimizations``: XLA backend
level 0, except in tests marked ``optimized``; XLA:CPU's faster-compiling element-wise emitters):
see ``COMPILE_EFFORT_ENV`` below.
"""

import gc
import importlib.metadata
import os
import subprocess
import sys

CALLER_ENV = dict(os.environ)  # before the CPU pinning below: what a GPU check subprocess sees

os.environ["JAX_PLATFORMS"] = "cpu"

# Compile effort. The suite compiles ~5,900 XLA programs (2026-12-02) and runs most of them a few
# times, so compiling is most of its time on 2 cores. Two settings, both on by default:
# - jax_disable_most_optimizations (XLA's backend at optimization level 0, LLVM's expensive passes
#   off): a tiny MoE train step compiled ~2x faster (18 vs 33 s on a loaded host) and ran ~2x
#   slower (108 vs 48 ms), side by side in one process. jax reads it at each compile, so tests
#   marked ``optimized`` (those that judge a TPU program: memory, FLOPs, kernels) compile at full
#   effort, as users' programs do.
# - XLA:CPU's element-wise IR emitters instead of its MLIR fusion emitters
#   (--xla_cpu_use_fusion_emitters=false): one whole file at a time, fresh compilation caches,
#   test_moe_model.py 179 -> 121 s, test_balance.py 64 -> 45 s, test_experiments_moe.py 80 -> 66 s
#   (2026-12-02); a train step runs ~1.4x slower. XLA reads XLA_FLAGS once per process and the flag
#   touches CPU programs only, so it holds for the whole run (TPU programs are unaffected).
# The HLO programs are the same. Set before jax is imported, so subprocesses that tests start
# inherit them; JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns both off, and a caller's own settings win.
COMPILE_EFFORT_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"
os.environ.setdefault(COMPILE_EFFORT_ENV, "1")
LOW_COMPILE_EFFORT = os.environ[COMPILE_EFFORT_ENV].lower() in ("1", "true", "yes", "on", "y", "t")
CPU_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA accepts ``flag`` (newer ones dropped the legacy emitters, and XLA
    aborts the process on an unknown flag): asked of a fresh interpreter, ~2 s, once per run."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flag},
                           timeout=300)
    return probe.returncode == 0


_xla_flags = os.environ.get("XLA_FLAGS", "").split()
if LOW_COMPILE_EFFORT and not any("xla_cpu_use_fusion_emitters" in f for f in _xla_flags):
    # the answer is kept for xdist workers (they inherit this environment): a "no" as well
    if os.environ.setdefault("MOEJAX_TEST_XLA_CPU_LEGACY_EMITTERS", str(
            int(xla_knows(CPU_FAST_COMPILE_FLAG)))) == "1":
        _xla_flags.append(CPU_FAST_COMPILE_FLAG)
if not any(f.startswith("--xla_force_host_platform_device_count") for f in _xla_flags):
    _xla_flags.append("--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = " ".join(_xla_flags)

# No moejax.runtime.tune_host_malloc here (the entry points apply it for long training loops;
# tests/test_runtime.py checks it in a subprocess): a test process compiles ~1,000 programs, and
# with one arena, no mmap chunks and no trimming its heap never shrank (7.5 GB RSS by the RL tests).

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if "jax_disable_most_optimizations" in jax.config.values:  # also where jax was imported first
    jax.config.update("jax_disable_most_optimizations", LOW_COMPILE_EFFORT)
assert jax.device_count() == 8, "conftest must run before anything imports jax"

import pytest  # noqa: E402

GPU_PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")


def no_gpu_reason() -> str | None:
    """Why jax has no GPU backend in the caller's environment (None: it has one). A plugin check
    first (free), then a fresh interpreter asks jax, since this process is pinned to CPU."""
    plugins = [d.metadata["Name"] for d in importlib.metadata.distributions()
               if (d.metadata["Name"] or "").lower().startswith(GPU_PLUGIN_PREFIXES)]
    if not plugins:
        return "needs a GPU: no jax GPU plugin is installed (e.g. pip install 'jax[cuda13]')"
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           env=CALLER_ENV, capture_output=True, text=True, timeout=300)
    backend = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "none"
    if probe.returncode or backend != "gpu":
        return f"needs a GPU: jax's default backend here is {backend!r} (plugins: {plugins})"
    return None


# Files of the longest wall time (2026-12-02, 2 cores), run first: with tests spread over xdist
# workers a file at a time (pyproject: -n auto --dist loadfile), starting the long files first keeps
# one of them from running alone at the end. Only the order depends on this list.
LONGEST_FIRST = ("test_rl_trainer.py", "test_aot.py", "test_experiment_rl_budget_mixture.py",
                 "test_hybrid.py", "test_resume.py", "test_moe_model.py",
                 "test_experiment_mixture.py", "test_moe_variants.py", "test_growth.py",
                 "test_experiment_reward_calibration.py", "test_experiment_gated.py",
                 "test_experiments_growth.py", "test_experiments_rl.py", "test_rl_wire.py",
                 "test_moe_dispatch.py", "test_routers_experiment.py")


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: probe only when a gpu test is selected
def pytest_collection_modifyitems(config, items):
    """Run the LONGEST_FIRST files first, in that order (the rest keep theirs, after them); skip
    the selected ``gpu`` tests, naming why, when jax has no GPU backend."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = no_gpu_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """An ``optimized`` test (its setup, module fixtures included, and any subprocess it starts)
    compiles at full effort; every other test at the suite's default (see COMPILE_EFFORT_ENV).
    Mark whole modules where a module fixture serves several tests."""
    if item.get_closest_marker("optimized") is None or \
            "jax_disable_most_optimizations" not in jax.config.values:
        yield
        return
    before = os.environ[COMPILE_EFFORT_ENV], jax.config.values["jax_disable_most_optimizations"]
    os.environ[COMPILE_EFFORT_ENV] = "0"
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        os.environ[COMPILE_EFFORT_ENV] = before[0]
        jax.config.update("jax_disable_most_optimizations", before[1])


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory, request) -> str:
    """One corpus/token cache for the whole session (built on first use by moejax.data), shared by
    xdist workers: moejax.data publishes each cache entry by an atomic rename, so two workers
    building the same entry at once both succeed and read the same bytes."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker's <basetemp>/popen-gwN
        root = root.parent
    path = root / "moejax-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (absent under -p no:xdist)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's default): one worker per core, at most one per 6 GiB of memory
    (a worker emulates 8 devices and holds a module's compiled programs: several GiB at peak)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 12.0
    return max(1, min(cores or 1, int(mem_gib // 6)))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop jax's compiled-program caches after each test module. Every live XLA:CPU executable
    holds ~7 memory maps; kept alive, they reached 58-64k maps by test ~1,000 (measured), near
    the kernel's vm.max_map_count of 65,530, where two runs had died with SIGSEGV while XLA
    serialized an executable (a failed mmap). Later modules recompile, or hit the persistent
    compilation cache."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_terminal_summary(terminalreporter):
    """Report this process's memory maps against the kernel's limit (the failure mode the
    fixture above prevents), so growth shows up before it crashes a run."""
    try:
        used = sum(1 for _ in open("/proc/self/maps"))
        limit = int(open("/proc/sys/vm/max_map_count").read())
    except OSError:  # not Linux
        return
    if used > limit // 4:
        terminalreporter.write_line(f"warning: {used} memory maps of vm.max_map_count={limit} "
                                    "at the end of the run (see tests/conftest.py)", yellow=True)
