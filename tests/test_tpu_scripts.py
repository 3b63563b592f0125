"""tpu/*.sh: the slice table, the exact --dry-run commands for a v5p-64 queued resource, the per-worker
command run for real (env, quoting, exit status, log, SIGTERM stop), and run.sh's auto-resume loop
against a fake ``gcloud`` that records its argv. Subprocesses only: no jax, no network, no TPU."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
HEAD = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                      check=True).stdout.strip()
REPO = "https://github.com/example/moejax.git"
COMMAND = ["python", "-m", "experiments.pretrain", "--preset", "tpu-v5p-64",
           "--workdir", "gs://bkt/runs/pretrain"]
SLICE = ["--name", "moe-pod", "--zone", "us-east5-a", "--type", "v5p-64"]


def bash(script: str, *args: str, env: dict | None = None, timeout: int = 60):
    return subprocess.run(["bash", str(TPU / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def lib(expr: str):
    """Evaluate a bash expression with tpu/lib.sh sourced."""
    return subprocess.run(["bash", "-c", f'. "{TPU}/lib.sh" && {expr}'], capture_output=True,
                          text=True, timeout=30)


def dry_run(*args: str) -> list[str]:
    out = bash("run.sh", "--dry-run", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def remote_command(line: str) -> str:
    """The --command string of a printed gcloud ssh line (parsed as a shell would)."""
    words = shlex.split(line)
    return words[words.index("--command") + 1]


# -- the slice table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("accel,chips,hosts,runtime", [
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"), ("v5p-16", 8, 2, "v2-alpha-tpuv5"),
    ("v5p-64", 32, 8, "v2-alpha-tpuv5"), ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"), ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-4", 4, 1, "v2-alpha-tpuv5-lite"), ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"), ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-64", 64, 16, "v2-alpha-tpuv6e"),
])
def test_slice_table_chips_hosts_runtime(accel, chips, hosts, runtime):
    """v4/v5p sizes count TensorCores (2 per chip), v5e/v6e count chips; multi-host slices have 4
    chips per host (Cloud TPU docs: v5p-64 = 2x4x4 = 32 chips on 8 machines)."""
    out = lib(f"slice_chips {accel}; slice_hosts {accel}; default_runtime {accel}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(chips), str(hosts), runtime]


@pytest.mark.parametrize("accel,message", [("v9x-8", "unknown accelerator type"),
                                           ("v5p-63", "must be even"), ("v5p", "must end in a size")])
def test_slice_table_rejects_bad_types(accel, message):
    out = lib(f"slice_hosts {accel}")
    assert out.returncode == 2 and message in out.stderr


# -- --dry-run ------------------------------------------------------------------------------------------
def expected_worker_line(worker: int, node: int = 0, name: str = "moe-pod") -> str:
    logs = f'"$HOME"/moejax-logs/{name}'
    job = (f"env JAX_COMPILATION_CACHE_DIR=gs://bkt/jax-cc MOEJAX_RUN_ID={name} "
           f"MOEJAX_SLICE={node} MOEJAX_WORKER={worker} " + " ".join(COMMAND) + " --distributed")
    remote = (f"cd moejax && . .venv/bin/activate && mkdir -p {logs} && echo $$ > "
              f"{logs}/s{node}-w{worker}.pid && trap true TERM && set -o pipefail && {job} 2>&1 | "
              f"(trap '' TERM; exec tee -p -a {logs}/s{node}-w{worker}.log); rc=$?; "
              f"rm -f {logs}/s{node}-w{worker}.pid; exit $rc")
    return shlex.join(["gcloud", "compute", "tpus", "queued-resources", "ssh", name,
                       "--zone=us-east5-a", f"--node={node}", f"--worker={worker}",
                       "--command", remote])


def test_dry_run_v5p64_prints_exact_per_worker_commands():
    lines = dry_run(*SLICE, "--spot", "--repo", REPO, "--bucket", "gs://bkt", "--", *COMMAND)
    assert ("gcloud compute tpus queued-resources create moe-pod --zone=us-east5-a "
            "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-id=moe-pod --spot"
            ) in lines
    workers = [ln for ln in lines if "MOEJAX_WORKER=" in ln]
    assert len(workers) == 8                           # v5p-64: 32 chips, 4 per host
    assert [shlex.split(w) for w in workers] == [shlex.split(expected_worker_line(i))
                                                for i in range(8)]
    code = next(ln for ln in lines if "git clone" in ln)
    assert f"git checkout -q --force --detach {HEAD}" in remote_command(code)
    assert "--worker=all" in code and "--node=all" in code
    setup = next(ln for ln in lines if "pip install" in ln)
    assert "pip install -q -e '.[tpu,gcs]'" in remote_command(setup)
    assert remote_command(setup).endswith(" gs://bkt/jax-cc")


def test_dry_run_keeps_a_given_distributed_flag_once_and_quotes_arguments():
    lines = dry_run(*SLICE, "--repo", REPO, "--env", "XLA_FLAGS=--a --b", "--",
                    "python", "-m", "x", "--set", "data.name=it's", "--distributed")
    remote = remote_command(next(ln for ln in lines if "MOEJAX_WORKER=0" in ln))
    job = shlex.split(remote.split("set -o pipefail && ")[1].split(" 2>&1 |")[0])
    assert job[-6:] == ["python", "-m", "x", "--set", "data.name=it's", "--distributed"]
    assert "XLA_FLAGS=--a --b" in job


def test_dry_run_multislice_uses_node_count_and_every_node():
    lines = dry_run(*SLICE, "--slices", "2", "--best-effort", "--repo", REPO, "--", *COMMAND)
    assert ("gcloud alpha compute tpus queued-resources create moe-pod --zone=us-east5-a "
            "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-count=2 "
            "--node-prefix=moe-pod --best-effort") in lines
    workers = [shlex.split(ln) for ln in lines if "MOEJAX_WORKER=" in ln]
    assert len(workers) == 16
    assert {(w[7], w[8]) for w in workers} == {(f"--node={s}", f"--worker={i}")
                                               for s in range(2) for i in range(8)}


def test_dry_run_copy_ships_the_checkout_with_scp():
    lines = dry_run(*SLICE, "--copy", "--", *COMMAND)
    assert any(ln.startswith("gcloud compute tpus queued-resources scp ") and
               "moe-pod:moejax-src.tgz" in ln for ln in lines)
    assert any("git ls-files -z -co --exclude-standard" in ln for ln in lines)
    assert not any("git clone" in ln for ln in lines)


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--type", "v5p-64", "--repo", REPO, "--", "x"], "--name is required"),
    ([*SLICE, "--repo", REPO], "give the command after --"),
    ([*SLICE, "--", "x"], "give --repo URL"),
    ([*SLICE, "--copy", "--rev", "HEAD", "--", "x"], "does not take --repo or --rev"),
    ([*SLICE, "--spot", "--reserved", "--repo", REPO, "--", "x"], "at most one of"),
    ([*SLICE, "--slices", "two", "--repo", REPO, "--", "x"], "--slices 'two'"),
    ([*SLICE, "--env", "oops", "--repo", REPO, "--", "x"], "use KEY=VALUE"),
    ([*SLICE, "--bucket", "s3://b", "--repo", REPO, "--", "x"], "give a gs:// URI"),
    (["--name", "Bad_Name", "--zone", "z", "--type", "v5p-64", "--", "x"], "lowercase"),
    ([*SLICE, "--frobnicate"], "unknown option '--frobnicate'"),
    ([*SLICE, "--rev", "no-such-rev", "--repo", REPO, "--", "x"], "is not a commit"),
])
def test_run_rejects_bad_arguments_with_a_usage_message(args, message):
    # no git repository to infer --repo from (a CI clone has an `origin` remote; this one has none)
    out = bash("run.sh", "--dry-run", *args, env={"GIT_DIR": "/nonexistent/.git"})
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "--help" in out.stderr and "Traceback" not in out.stderr


# -- the per-worker command, run for real on this machine ------------------------------------------------
JOB = textwrap.dedent("""\
    import os, signal, sys, time
    def stop(*_):
        print("saving", flush=True); time.sleep(0.5)
        print("[a] stopped at step 3 (checkpoint saved); rerun the command to resume", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("worker", os.environ["MOEJAX_WORKER"], "cache", os.environ["JAX_COMPILATION_CACHE_DIR"],
          "args", sys.argv[1:], flush=True)
    if sys.argv[1] == "wait":
        time.sleep(60)
    sys.exit(int(sys.argv[2]))
""")


@pytest.fixture
def worker_home(tmp_path):
    """A fake worker: $HOME with the code directory and a venv activate script."""
    (tmp_path / "moejax" / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "moejax" / ".venv" / "bin" / "activate").write_text("")
    (tmp_path / "job.py").write_text(JOB)
    return tmp_path


def worker_shell(home: Path, *job_args: str) -> subprocess.Popen:
    """Run worker 3's exact command as sshd would: its own session, the login shell with -c."""
    lines = dry_run(*SLICE, "--repo", REPO, "--cache-dir", "/tmp/cc", "--",
                    sys.executable, str(home / "job.py"), *job_args)
    remote = remote_command(next(ln for ln in lines if "MOEJAX_WORKER=3" in ln))
    return subprocess.Popen(["bash", "-c", remote], cwd=home, env={**os.environ, "HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_worker_command_passes_env_args_and_exit_status_and_logs(worker_home):
    proc = worker_shell(worker_home, "exit", "3", "it's a b")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3
    expected = "worker 3 cache /tmp/cc args ['exit', '3', \"it's a b\", '--distributed']"
    assert out.strip() == expected
    logs = worker_home / "moejax-logs" / "moe-pod"
    assert (logs / "s0-w3.log").read_text().strip() == expected
    assert not (logs / "s0-w3.pid").exists()


def test_stop_sends_sigterm_so_the_job_saves_and_its_log_is_complete(worker_home):
    proc = worker_shell(worker_home, "wait", "0")
    pid_file = worker_home / "moejax-logs" / "moe-pod" / "s0-w3.pid"
    log_file = pid_file.parent / "s0-w3.log"
    deadline = time.monotonic() + 60  # a loaded CI host: the pid file can come before the log
    while not (pid_file.exists() and log_file.exists() and "worker 3" in log_file.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the job never started"
        time.sleep(0.1)
    stop = lib("remote_stop moe-pod 20")
    subprocess.run(["bash", "-c", stop.stdout], env={**os.environ, "HOME": str(worker_home)},
                   check=True, timeout=60)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    log = (pid_file.parent / "s0-w3.log").read_text()
    assert "saving" in log and "rerun the command to resume" in log and out == log
    assert not pid_file.exists()


def run_remote(remote: str, home: Path, path_prefix: Path | None = None):
    """Run a worker command as the worker's login shell would, in a fake home."""
    path = f"{path_prefix}{os.pathsep}{os.environ['PATH']}" if path_prefix else os.environ["PATH"]
    return subprocess.run(["bash", "-c", remote], cwd=home, capture_output=True, text=True,
                          env={**os.environ, "HOME": str(home), "PATH": path}, timeout=120)


def test_code_step_clones_then_fetches_the_pinned_revision(tmp_path):
    """--rev: the worker clones the repo, checks out the commit; a second deploy (the next attempt)
    reuses the clone."""
    lines = dry_run(*SLICE, "--repo", str(ROOT), "--", *COMMAND)
    remote = remote_command(next(ln for ln in lines if "git clone" in ln))
    for _ in range(2):
        out = run_remote(remote, tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"code at {HEAD}")
    head = subprocess.run(["git", "-C", str(tmp_path / "moejax"), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert head == HEAD


def test_copy_step_ships_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    out = lib(f'checkout_tarball "{home}/moejax-src.tgz"')
    assert out.returncode == 0, out.stderr
    lines = dry_run(*SLICE, "--copy", "--", *COMMAND)
    remote = remote_command(next(ln for ln in lines if "tar xzf" in ln))
    out = run_remote(remote, home)
    assert out.returncode == 0, out.stderr
    shipped = {p.relative_to(home / "moejax").as_posix()
               for p in (home / "moejax").rglob("*") if p.is_file()}
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert shipped == {f for f in listed if (ROOT / f).exists()}
    assert "tpu/run.sh" in shipped and not any(f.startswith(".venv/") for f in shipped)
    assert not (home / "moejax-src.tgz").exists()


def test_setup_step_is_idempotent_and_creates_the_cache_dir(tmp_path):
    """A worker already set up: no apt, no pip; the compile-cache dir is created (through etils,
    as for gs://) on the first run and accepted on the second."""
    code = tmp_path / "moejax"
    (code / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", code / "pyproject.toml")
    (code / ".venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (code / ".venv" / "bin" / "python").chmod(0o755)
    (code / ".venv" / "bin" / "activate").write_text(f'PATH="{code}/.venv/bin:$PATH"\n')
    digest = subprocess.run(["bash", "-c", f"cat {code}/pyproject.toml | sha256sum | cut -c1-16"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (code / ".venv" / f".moejax-setup-{digest}").touch()
    fake_bin = tmp_path / "bin"   # python3.11 with ensurepip; sudo/pip that must not be called
    fake_bin.mkdir()
    for name, body in [("python3.11", f'exec "{sys.executable}" "$@"'),
                       ("sudo", "echo sudo called >&2; exit 99"), ("pip", "echo pip called >&2; exit 99")]:
        (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake_bin / name).chmod(0o755)
    remote = remote_command(bash("setup.sh", "--name", "moe-pod", "--zone", "z", "--cache-dir",
                                 "cache/jax-cc", "--dry-run").stdout)
    for _ in range(2):
        out = run_remote(remote, tmp_path, fake_bin)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("compile cache: cache/jax-cc")
    assert (code / "cache" / "jax-cc").is_dir()
    (code / ".venv" / f".moejax-setup-{digest}").unlink()   # pyproject changed: pip runs, and fails
    out = run_remote(remote, tmp_path, fake_bin)
    assert out.returncode != 0 and "pip called" in out.stderr and "compile cache" not in out.stdout


# -- the auto-resume loop against a fake gcloud ---------------------------------------------------------
FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # A fake gcloud: records its argv, keeps one queued resource's state, fails worker runs on cue.
    import fcntl, json, os, sys, time
    args, state_file = sys.argv[1:], os.environ["FAKE_STATE"]
    lock = open(state_file + ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # the launcher runs 8 of these at once
    state = json.load(open(state_file)) if os.path.exists(state_file) else {{"qr": None, "creates": 0}}
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    cmd = " ".join(a for a in args if not a.startswith("-"))
    rc = 0
    if "queued-resources describe" in cmd:
        if state["qr"] is None:
            print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: moe-pod",
                  file=sys.stderr)
            rc = 1
        else:
            print(state["qr"])
    elif "queued-resources create" in cmd:
        state["qr"], state["creates"] = "ACTIVE", state["creates"] + 1
    elif "queued-resources delete" in cmd:
        state["qr"] = None
    elif "queued-resources ssh" in cmd and "git clone" in args[-1]:
        state["code_fails"] = state.get("code_fails", 0) + 1
        rc = int(state["code_fails"] <= int(os.environ.get("FAKE_CODE_FAILS", "0")))
    elif "queued-resources ssh" in cmd and "MOEJAX_WORKER=" in args[-1]:
        worker = next(a for a in args if a.startswith("--worker=")).split("=")[1]
        plan = json.loads(os.environ["FAKE_PLAN"])[state["creates"] - 1]  # per attempt
        print(f"fake worker {{worker}} of attempt {{state['creates']}}")
        if plan.get("say"):
            print(plan["say"])
        rc = plan.get("codes", {{}}).get(worker, 0)
        if rc and plan.get("preempt"):
            state["qr"] = "SUSPENDED"
        if plan.get("sleep"):
            with open(state_file + ".sleepers", "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            json.dump(state, open(state_file, "w"))
            lock.close()
            time.sleep(plan["sleep"])
    json.dump(state, open(state_file, "w"))
    sys.exit(rc)
""")


@pytest.fixture
def fake_gcloud(tmp_path):
    """A directory on PATH with a ``gcloud`` that records its calls into calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    return tmp_path


def launcher(tmp: Path, plan: list[dict], *extra: str, code_fails: int = 0) -> subprocess.Popen:
    """tpu/run.sh for real, with the fake gcloud first on PATH (and $GCLOUD unset)."""
    env = {"PATH": f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp),
           "FAKE_STATE": str(tmp / "state.json"), "FAKE_CALLS": str(tmp / "calls.jsonl"),
           "FAKE_PLAN": json.dumps(plan), "MOEJAX_TPU_POLL_WORKERS_S": "0.2",
           "FAKE_CODE_FAILS": str(code_fails)}
    return subprocess.Popen([*DEFAULT_SIGINT, "bash", str(TPU / "run.sh"), *SLICE, "--spot",
                             "--repo", REPO, "--bucket", "gs://bkt", "--poll", "0", "--grace", "0",
                             *extra, "--", *COMMAND],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={k: v for k, v in {**os.environ, **env}.items()
                                           if k != "GCLOUD"})


# Runs its arguments with Ctrl-C's default action even where this process ignores SIGINT (an
# xdist worker, a background job of a non-interactive shell): bash cannot trap a signal ignored
# when it started. An exec wrapper, not preexec_fn (Python code between fork and exec can
# deadlock in a process with jax's threads).
DEFAULT_SIGINT = (sys.executable, "-c",
                  "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execvp(sys.argv[1], sys.argv[1:])")


def recorded(tmp: Path) -> list[list[str]]:
    path = tmp / "calls.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def run_for_real(tmp: Path, plan: list[dict], *extra: str, code_fails: int = 0):
    proc = launcher(tmp, plan, *extra, code_fails=code_fails)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), recorded(tmp)


def kinds(calls: list[list[str]]) -> list[str]:
    """Each call as create / delete / describe / code / setup / run / stop / logs."""
    def kind(c):
        if c[0] == "storage":
            return "logs"
        if c[3] != "ssh":
            return c[3]
        for word, name in [("git clone", "code"), ("pip install", "setup"),
                           ("MOEJAX_WORKER=", "run"), ("kill -TERM", "stop")]:
            if word in c[-1]:
                return name
        return "other"
    return [kind(c) for c in calls]


def test_run_recreates_a_preempted_slice_and_reruns_until_done(fake_gcloud):
    plan = [{"codes": {"2": 255}, "preempt": True}, {}]   # attempt 1: worker 2's VM goes away
    out, calls = run_for_real(fake_gcloud, plan)
    assert out.returncode == 0, out.stderr
    k = kinds(calls)
    assert k.count("create") == 2 and k.count("delete") == 1 and k.count("run") == 16
    first_run, delete = k.index("run"), k.index("delete")
    assert k[:first_run] == ["describe", "create", "describe", "stop", "code", "setup"]
    assert first_run < delete < len(k) - k[::-1].index("create")
    assert calls[k.index("create")] == [
        "compute", "tpus", "queued-resources", "create", "moe-pod", "--zone=us-east5-a",
        "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--node-id=moe-pod",
        "--spot"]
    assert "stop" in k[delete - 3:]                     # the survivors were stopped before
    assert k[-1] == "logs" and calls[-1][-1] == "gs://bkt/tpu-logs/"
    log = (fake_gcloud / "moejax-tpu-logs" / "moe-pod" / "s0-w2.log").read_text()
    assert "=== attempt 1" in log and "fake worker 2 of attempt 1" in log
    assert "=== attempt 2" in log and "fake worker 2 of attempt 2" in log


def test_run_reruns_after_a_clean_preemption_exit_on_the_same_slice(fake_gcloud):
    """SIGTERM makes moejax save and exit 0 with the resume hint: that is not done."""
    plan = [{"say": "[a] stopped at step 7 (checkpoint saved); rerun the command to resume"}, {}]
    # the slice stays ACTIVE: the second attempt reuses it (no second create)
    out, calls = run_for_real(fake_gcloud, plan, "--max-restarts", "1")
    assert out.returncode == 1 and "giving up after 1 restarts" in out.stderr
    assert kinds(calls).count("run") == 16 and kinds(calls).count("create") == 1


def test_run_stops_on_a_configuration_error_without_retrying(fake_gcloud):
    out, calls = run_for_real(fake_gcloud, [{"codes": {"0": 2}}, {}])
    assert out.returncode == 1 and "configuration/data error" in out.stderr
    assert kinds(calls).count("run") == 8 and kinds(calls).count("create") == 1


@pytest.mark.parametrize("code_fails,rc", [(2, 0), (3, 1)])
def test_first_code_step_gets_three_tries_then_fails(fake_gcloud, code_fails, rc):
    """A slice that just became ACTIVE may refuse ssh for a while; a persistent failure on the
    first attempt (a wrong --repo) stops the launcher instead of looping."""
    out, calls = run_for_real(fake_gcloud, [{}], code_fails=code_fails)
    assert out.returncode == rc, out.stderr
    k = kinds(calls)
    assert k.count("code") == 3 and k.count("run") == (8 if rc == 0 else 0)
    if rc:
        assert "putting the code on the workers or setting them up failed" in out.stderr


def test_ctrl_c_stops_the_job_on_every_worker_and_does_not_rerun(fake_gcloud):
    proc = launcher(fake_gcloud, [{"sleep": 30}])
    for _ in range(300):
        if kinds(recorded(fake_gcloud)).count("run") == 8:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr
    k = kinds(recorded(fake_gcloud))
    assert k.count("run") == 8 and k.count("create") == 1 and "delete" not in k
    assert k[-2:] == ["stop", "logs"]
    sleepers = [int(p) for p in (fake_gcloud / "state.json.sleepers").read_text().split()]
    assert len(sleepers) == 8
    time.sleep(1)
    assert not [p for p in sleepers if alive(p)]        # the launcher's ssh processes are gone


def alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_gcloud_env_var_substitutes_the_binary(fake_gcloud):
    out = bash("stop.sh", "--name", "moe-pod", "--zone", "z", "--delete",
               env={"GCLOUD": str(fake_gcloud / "bin" / "gcloud"), "HOME": str(fake_gcloud),
                    "FAKE_STATE": str(fake_gcloud / "state.json"),
                    "FAKE_CALLS": str(fake_gcloud / "calls.jsonl"), "FAKE_PLAN": "[]"})
    assert out.returncode == 0, out.stderr
    calls = [json.loads(ln) for ln in (fake_gcloud / "calls.jsonl").read_text().splitlines()]
    assert kinds(calls) == ["stop", "delete"]
    assert calls[1] == ["compute", "tpus", "queued-resources", "delete", "moe-pod", "--zone=z",
                        "--force", "--quiet"]


# -- lint ---------------------------------------------------------------------------------------------------
def test_scripts_pass_shellcheck_or_bash_syntax():
    assert {p.name for p in SCRIPTS} >= {"lib.sh", "run.sh", "setup.sh", "deploy.sh", "logs.sh",
                                         "stop.sh"}
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        out = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True,
                             text=True, cwd=ROOT)
        assert out.returncode == 0, out.stdout
    for script in SCRIPTS:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)


def test_every_remote_command_is_valid_shell():
    """The strings the workers run (code, setup, run, stop) parse in bash."""
    lines = dry_run(*SLICE, "--repo", REPO, "--", *COMMAND)
    remotes = [remote_command(ln) for ln in lines if "--command" in ln]
    assert len(remotes) == 2 + 8 + 1
    for remote in remotes:
        out = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
        assert out.returncode == 0, (remote, out.stderr)


def test_scripts_are_executable_and_answer_help():
    for script in ["run.sh", "setup.sh", "deploy.sh", "logs.sh", "stop.sh"]:
        assert os.access(TPU / script, os.X_OK), script
        out = bash(script, "--help")
        assert out.returncode == 0 and out.stdout.startswith("usage: bash tpu/"), script


def test_logs_shows_the_tail_of_every_worker(tmp_path):
    (tmp_path / "r1").mkdir()
    for w in range(2):
        (tmp_path / "r1" / f"s0-w{w}.log").write_text("".join(f"line {i} w{w}\n" for i in range(5)))
    out = bash("logs.sh", "r1", "--log-dir", str(tmp_path), "--lines", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["==> s0-w0.log <==", "line 3 w0", "line 4 w0",
                                       "==> s0-w1.log <==", "line 3 w1", "line 4 w1"]
    missing = bash("logs.sh", "r2", "--log-dir", str(tmp_path))
    assert missing.returncode == 1 and "no logs" in missing.stderr

