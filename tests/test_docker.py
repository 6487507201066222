"""docker/Dockerfile and docker/README.md stay in step with README.md and pyproject.toml.

No Docker engine is needed: the files are parsed. The Dockerfile must install
the package from the source tree in the same ``pip install '.[...]'`` form as
README.md, with README's extras plus the CUDA 12 one, every extra must exist in
pyproject.toml, the entry point must be the ``[project.scripts]`` command, and
everything the install needs must be copied into the image.
"""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKER_README = ROOT / "docker" / "README.md"
# Python of the distribution each CUDA base image is built on.
UBUNTU_PYTHON = {"20.04": (3, 8), "22.04": (3, 10), "24.04": (3, 12)}


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions():
    """(INSTRUCTION, argument) pairs of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, arg = line.partition(" ")
            out.append((word.upper(), arg.strip()))
    return out


def _pip_installs(shell_text):
    """Targets of every ``pip install`` in shell text, as written (quotes kept) and parsed."""
    found = []
    for cmd in re.split(r"&&|;|\n", shell_text):
        words = shlex.split(cmd, posix=False)
        for i in range(len(words) - 1):
            if words[i] in ("pip", "pip3") and words[i + 1] == "install" or (
                    words[i] == "pip" and i > 0 and words[i - 1] == "-m" and words[i + 1] == "install"):
                args = [w for w in words[i + 2:] if not w.startswith("-")]
                found.extend((raw, _parse_target(raw)) for raw in args)
    return found


def _parse_target(raw):
    """``'.[a,b]'`` -> ('.', {'a', 'b'}); ``.`` -> ('.', set()); other packages -> (name, None)."""
    target = raw.strip("'\"")
    m = re.fullmatch(r"(\.)(?:\[([\w,\s-]*)\])?", target)
    if not m:
        return target, None
    return ".", {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def _bash_blocks(path):
    return re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def _source_install():
    runs = [arg for word, arg in _instructions() if word == "RUN"]
    installs = [(raw, parsed) for run in runs for raw, parsed in _pip_installs(run) if parsed[1] is not None]
    assert len(installs) == 1, f"the Dockerfile must install the source tree exactly once, found {installs}"
    return installs[0]


def test_dockerfile_installs_like_the_readme_plus_cuda12():
    readme = [(raw, parsed) for block in _bash_blocks(ROOT / "README.md") for raw, parsed in _pip_installs(block)]
    sources = [(raw, parsed) for raw, parsed in readme if parsed[1] is not None]
    assert sources, "README.md has no `pip install .` line to compare with"
    raw, (target, extras) = _source_install()
    assert target == "."
    readme_extras = set().union(*(p[1] for _, p in sources))
    assert readme_extras | {"cuda12"} <= extras, (extras, readme_extras)
    # Same form: quoted like README's lines with extras (the shell must not glob the brackets).
    quoted = {r[0] for r, (_, e) in sources if e}
    if quoted:
        assert raw[0] in quoted, (raw, quoted)
    defined = set(_pyproject()["project"]["optional-dependencies"])
    assert extras <= defined, f"extras {sorted(extras - defined)} are not in pyproject.toml"


def test_cuda_image_matches_the_cupy_extra_and_python():
    base = [arg for word, arg in _instructions() if word == "FROM"]
    assert len(base) == 1
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(runtime|cudnn-runtime|devel)-ubuntu(\d+\.\d+)", base[0])
    assert m, base[0]
    assert m.group(1) == "12"
    project = _pyproject()["project"]
    assert any(d.startswith("cupy-cuda12x") for d in project["optional-dependencies"]["cuda12"])
    major, minor = UBUNTU_PYTHON[m.group(4)]
    need = re.fullmatch(r">=\s*(\d+)\.(\d+)", project["requires-python"])
    assert need and (major, minor) >= (int(need.group(1)), int(need.group(2)))


def test_entry_point_is_the_project_script():
    scripts = _pyproject()["project"]["scripts"]
    entry = [arg for word, arg in _instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1
    import json

    argv = json.loads(entry[0])
    assert argv == ["gpureg"] and "gpureg" in scripts
    module, _, func = scripts["gpureg"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_everything_the_install_needs_is_copied():
    meta = _pyproject()
    copied = set()
    for word, arg in _instructions():
        if word == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                copied.add(src.rstrip("/"))
    needed = {"pyproject.toml", meta["project"]["readme"]}
    setuptools = meta["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    for pkg in setuptools["packages"]:
        needed.add(package_dir.get(pkg, pkg.replace(".", "/")).split("/")[0])
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_docker_readme_commands():
    blocks = "\n".join(_bash_blocks(DOCKER_README))
    builds = [line for line in blocks.splitlines() if line.strip().startswith("docker build")]
    assert builds and all("-f docker/Dockerfile" in b and b.split()[-1] == "." for b in builds)
    workdir = [arg for word, arg in _instructions() if word == "WORKDIR"][-1]
    runs = [shlex.split(line) for line in blocks.splitlines() if line.strip().startswith("docker run")]
    assert runs and all("--gpus" in r and r[r.index("--gpus") + 1] == "all" for r in runs)
    mounts = [r[r.index("-v") + 1] for r in runs if "-v" in r]
    assert mounts and all(m.split(":")[1] == workdir for m in mounts), (mounts, workdir)
    from gpureg.cli import app

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    for r in runs:
        if "--entrypoint" in r:
            continue
        image = r.index("gpureg", 2)  # the image name; the command follows it
        assert r[image + 1] in commands, (r, sorted(commands))
    # The README quotes the Dockerfile's install line.
    raw, _ = _source_install()
    assert f"pip install {raw}" in DOCKER_README.read_text()
