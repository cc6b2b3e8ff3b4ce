#!/usr/bin/env python3
"""Build the project's container images, with a registry or without one: `make image`, `make image-gpu`.

    python3 scripts/image.py cpu     # tasn:cpu and tasn:<version>-cpu (infra/docker/Dockerfile.cpu)
    python3 scripts/image.py cuda    # tasn:cuda and tasn:<version>-cuda13.0 (infra/docker/Dockerfile), on tasn:cpu

With podman (or docker where that is what the machine has; `--engine`). Where nothing is installed
and this runs as root on Debian, podman and its helpers come from apt. The Dockerfiles pin their
bases by digest; a base that is neither here nor pullable is replaced by a local stand-in, built
from packages only and passed with `--build-context REF=container-image://...` (the Dockerfile is
not edited): Debian bookworm with its python3 (3.11) made by mmdebstrap for python:3.11-slim-bookworm,
and uv's binary from its hash-pinned PyPI wheel for ghcr.io/astral-sh/uv. Inside the build, uv
reaches the package index this machine's pip is configured for (`pip config list`: the index, the
local wheel folders, the CA bundle), given to the build as a mounted /etc/uv/uv.toml, never baked in.

podman keeps every build's layers: after a build, what earlier builds left (the image the tags
pointed at before, a build stage's last layer, the cache layers only they held) is removed, and
nothing else, so repeated builds do not fill the disk. Stdlib only:
it runs with the system python3, before the project's virtual environment exists.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "infra" / "docker"
CONTAINERS_CONF = DOCKER / "containers.conf"
BUILD_TOOLS = DOCKER / "build-tools.lock"  # uv's wheel, hash-pinned, for the offline uv stand-in
APT_PACKAGES = ("podman", "runc", "mmdebstrap", "uidmap", "slirp4netns", "fuse-overlayfs",
                "containernetworking-plugins", "conmon", "catatonit")
DEBIAN_BASE = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "netbase", "tzdata")
PULL_TIMEOUT_S = 90
COMMIT_ENV, REVISION_LABEL = "TASN_GIT_COMMIT", "org.opencontainers.image.revision"  # the lineage models record
BUILD_LABEL = "io.tasn.build"  # on every layer of these builds (Dockerfile.cpu)


@dataclass(frozen=True)
class Variant:
    dockerfile: Path
    suffix: str  # of the versioned tag
    needs: str | None = None  # the variant whose image this one is built on


VARIANTS = {"cpu": Variant(DOCKER / "Dockerfile.cpu", "cpu"),
            "cuda": Variant(DOCKER / "Dockerfile", "cuda13.0", needs="cpu")}


def say(msg: str) -> None:
    print(f"[image] {msg}", flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True, capture: bool = False,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    if not capture:
        say("+ " + shlex.join(cmd))
    return subprocess.run(cmd, env=env, check=check, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)


def project_version() -> str:
    m = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if not m:
        sys.exit("error: no version in pyproject.toml")
    return m.group(1)


def tags(variant: str) -> list[str]:
    return [f"tasn:{variant}", f"tasn:{project_version()}-{VARIANTS[variant].suffix}"]


# --- the engine -------------------------------------------------------------------------------

def install_podman() -> None:
    """podman and what it needs, from Debian, when this is root on a Debian machine; else say what is missing."""
    missing = [b for b in ("podman", "runc", "conmon", "mmdebstrap") if not shutil.which(b)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"error: {', '.join(missing)} not found, and installing needs root on Debian: "
                 f"apt-get install --no-install-recommends {' '.join(APT_PACKAGES)} (or use docker: --engine docker)")
    say(f"installing {' '.join(APT_PACKAGES)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, check=False)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], env=env)


def choose_engine(requested: str | None) -> str:
    if requested == "docker" or (requested is None and not shutil.which("podman") and shutil.which("docker")
                                 and run(["docker", "info"], check=False, capture=True).returncode == 0):
        if not shutil.which("docker"):
            sys.exit("error: --engine docker, but docker is not installed")
        return "docker"
    install_podman()
    return "podman"


def engine_env(engine: str) -> dict[str, str]:
    """podman reads the project's settings (runc, ulimits; infra/docker/containers.conf) unless the
    caller chose a containers.conf of their own."""
    env = dict(os.environ)
    if engine == "podman":
        env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def image_id(engine: str, ref: str, env: dict[str, str]) -> str | None:
    res = run([engine, "image", "inspect", "--format", "{{.Id}}", ref], env=env, check=False, capture=True)
    return res.stdout.strip() if res.returncode == 0 else None


# --- bases: the pinned one, else a stand-in built from packages ---------------------------------

def from_refs(dockerfile: Path) -> list[str]:
    """The registry references the Dockerfile builds FROM (stage names and ${ARG} bases left out)."""
    stages: set[str] = set()
    refs = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            ref, name = m.group(1), m.group(2)
            if ref not in stages and "$" not in ref:
                refs.append(ref)
            if name:
                stages.add(name)
    return refs


def debian_mirror() -> list[str]:
    """This machine's Debian sources when they are bookworm's (the mirror apt uses here), else none:
    mmdebstrap's default, deb.debian.org with bookworm-updates and -security."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file() and "bookworm" in sources.read_text():
        return [str(sources)]
    return []


def make_debian_base(tag: str, engine: str, env: dict[str, str]) -> None:
    """Debian bookworm, minbase + python3 (3.11), as an image: the stand-in for python:3.11-slim-bookworm."""
    if not shutil.which("mmdebstrap"):
        install_podman()
    excluded = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "info", "locale")]
    with tempfile.TemporaryDirectory(prefix="tasn-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        run(["mmdebstrap", "--variant=minbase", f"--include={','.join(DEBIAN_BASE)}", *excluded,
             "--dpkgopt=path-include=/usr/share/doc/*/copyright", "bookworm", str(tar), *debian_mirror()])
        run([engine, "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', str(tar), tag], env=env)


def pip() -> list[str]:
    """pip of this python, else of the project's virtual environment (a Debian python3 may have none)."""
    for python in (sys.executable, str(ROOT / ".venv" / "bin" / "python")):
        cmd = [python, "-m", "pip"]
        if Path(python).exists() and subprocess.run([*cmd, "--version"], capture_output=True).returncode == 0:
            return cmd
    sys.exit("error: no pip to fetch uv's wheel with: apt-get install python3-pip, or `make install` first")


def make_uv(tag: str, engine: str, env: dict[str, str]) -> None:
    """uv's binaries from its PyPI wheel (sha256-pinned in infra/docker/build-tools.lock) as an image
    with /uv and /uvx, the layout of ghcr.io/astral-sh/uv."""
    machine = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}[platform.machine()]
    with tempfile.TemporaryDirectory(prefix="tasn-uv-") as tmp:
        run([*pip(), "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
             "--platform", f"manylinux_2_17_{machine}", "--python-version", "3.11", "-d", tmp, "-r", str(BUILD_TOOLS)])
        (wheel,) = Path(tmp).glob("uv-*.whl")
        tar = Path(tmp) / "uv.tar"
        with zipfile.ZipFile(wheel) as zf, tarfile.open(tar, "w") as out:
            for name in ("uv", "uvx"):
                (member,) = [n for n in zf.namelist() if re.fullmatch(rf"uv-[^/]+\.data/scripts/{name}", n)]
                data = zf.read(member)
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o755
                out.addfile(info, fileobj=io.BytesIO(data))
        run([engine, "import", str(tar), tag], env=env)


STANDINS = {  # registry name:tag -> (local stand-in tag, how to make it)
    "python:3.11-slim-bookworm": ("localhost/tasn-base/python:3.11-bookworm", make_debian_base),
    "ghcr.io/astral-sh/uv:0.8.22": ("localhost/tasn-base/uv:0.8.22", make_uv),
}


def resolve_base(ref: str, engine: str, env: dict[str, str], mode: str) -> tuple[str | None, str]:
    """(a --build-context value or None, what the base is) for one FROM reference."""
    if image_id(engine, ref, env):
        return None, ref
    name = ref.split("@")[0]
    standin, make = STANDINS.get(name, (None, None))
    if mode != "local" and not (mode == "auto" and standin and image_id(engine, standin, env)):
        try:
            if run([engine, "pull", "--quiet", ref], env=env, check=False, capture=True,
                   timeout=PULL_TIMEOUT_S).returncode == 0:
                return None, ref
        except subprocess.TimeoutExpired:
            pass
        if mode == "registry":
            sys.exit(f"error: cannot pull {ref} (--base registry)")
        say(f"{ref} cannot be pulled: building from a local stand-in")
    if standin is None or make is None:
        sys.exit(f"error: {ref} is not here, cannot be pulled, and has no stand-in in scripts/image.py")
    if not image_id(engine, standin, env):
        started = time.monotonic()
        make(standin, engine, env)
        say(f"made {standin} in {time.monotonic() - started:.0f} s")
    return f"{ref}=container-image://{standin}", f"{standin} (stand-in for {name})"


# --- the package index inside the build --------------------------------------------------------

def pip_config() -> dict[str, str]:
    """`pip config list` as {key: value}, keys without their scope (global., :env:., user. ...)."""
    res = subprocess.run([*pip(), "config", "list"], capture_output=True, text=True)
    out: dict[str, str] = {}
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        m = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def uv_settings(config: dict[str, str]) -> tuple[str, list[str]]:
    """(uv.toml text, host paths to mount at the same place) from pip's configuration."""
    local = []

    def mount_of(location: str) -> str:
        path = Path(location.removeprefix("file://"))
        if location.startswith(("file://", "/")) and path.exists():
            local.append(str(path.parent if path.name == "simple" else path))  # simple/ links to ../files
        return location

    lines = ['index-strategy = "unsafe-best-match"']  # the local folders and the index hold the same files
    if config.get("index-url"):
        lines.append(f"index-url = {json.dumps(mount_of(config['index-url']))}")
    for key in ("extra-index-url", "find-links"):
        values = [mount_of(v) for v in config.get(key, "").split()]
        if values:
            lines.append(f"{key} = {json.dumps(values)}")
    head = []
    if config.get("cert") and Path(config["cert"]).is_file():
        head = ["native-tls = true"]  # the system store, with the host's bundle mounted over it
        local.append(config["cert"])
    return "\n".join([*head, "", "[pip]", *lines]) + "\n", sorted(set(local))


# --- build, check, prune --------------------------------------------------------------------------

def git_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = res.stdout.strip() if res.returncode == 0 else ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        say(f"warning: the checkout has uncommitted changes; the image is labelled with {commit or 'no commit'}")
    return commit


def build(variant: str, engine: str, env: dict[str, str], mode: str) -> None:
    spec = VARIANTS[variant]
    names = tags(variant)
    commit = git_commit()
    cmd = [engine, "build", "-f", str(spec.dockerfile), "--build-arg", f"VERSION={project_version()}",
           "--build-arg", f"GIT_COMMIT={commit}"]
    if spec.needs:
        cmd += ["--build-arg", f"BASE_IMAGE={tags(spec.needs)[1]}"]
    bases = []
    for ref in from_refs(spec.dockerfile):
        context, what = resolve_base(ref, engine, env, mode) if engine == "podman" else (None, ref)
        if context:
            cmd += ["--build-context", context]
        bases.append(what)
    if bases and "python" in bases[-1]:
        cmd += ["--build-arg", f"BASE_NAME={bases[-1]}"]
    with tempfile.TemporaryDirectory(prefix="tasn-uvconf-") as tmp:
        if engine == "podman":
            text, mounts = uv_settings(pip_config())
            (Path(tmp) / "uv.toml").write_text(text)
            cmd += ["--layers", "--force-rm", "--pull=never", "--network", "host",
                    "-v", f"{tmp}/uv.toml:/etc/uv/uv.toml:ro"]
            cmd += [arg for path in mounts for arg in ("-v", f"{path}:{path}:ro")]
        for name in names:
            cmd += ["-t", name]
        started = time.monotonic()
        run([*cmd, str(ROOT)], env=env)
    took = time.monotonic() - started
    if engine == "podman":
        prune_leftovers(env)
    info = json.loads(run([engine, "image", "inspect", names[0]], env=env, capture=True).stdout)[0]
    config = info.get("Config") or {}
    recorded = ((config.get("Labels") or {}).get(REVISION_LABEL), f"{COMMIT_ENV}={commit}" in (config.get("Env") or []))
    if recorded != (commit, True):  # podman 4.3 can reuse a cached LABEL/ENV step (see Dockerfile.cpu)
        sys.exit(f"error: {names[0]} does not carry the commit {commit} (label, env: {recorded})")
    say(f"built {', '.join(names)} in {took / 60:.1f} min: {int(info['Size']) / 1e9:.2f} GB, commit {commit[:12]}")


def prune_leftovers(env: dict[str, str]) -> None:
    """Remove what earlier builds of these Dockerfiles left behind and nothing else: the untagged
    images without children that carry the builds' label (the image a rebuild replaced, a build
    stage's last layer), and then, as podman prunes until none is left, the cache layers only they
    held. The current images and their cache are tagged or have children, so they stay."""
    res = run(["podman", "image", "prune", "--force", "--filter", f"label={BUILD_LABEL}"], env=env, check=False,
              capture=True)
    gone = [line for line in res.stdout.splitlines() if line.strip()]
    say(f"removed {len(gone)} image(s) and cache layer(s) that earlier builds left" if res.returncode == 0
        else f"could not prune: {res.stderr.strip()[-300:]}")


CUDA_CHECK = """
import logging, shutil, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
import tasn.ops as ops
assert shutil.which("nvcc") is None, "nvcc is on PATH in the runtime image"
assert ops.load(required=True)
lib = str(ops._loaded)
assert lib.startswith("/opt/tasn-ops/"), lib
kernels = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key("tasn::bilinear_gather", k)]
assert kernels == ["CPU", "CUDA"], kernels
print(f"torch.ops.tasn.attention_sample from {lib} (kernels {kernels}), no nvcc:", torch.ops.tasn.attention_sample)
"""


def check_cuda(engine: str, env: dict[str, str]) -> None:
    """The CUDA image loads the prebuilt op without a compiler, on this (GPU-less) machine."""
    run([engine, "run", "--rm", "--read-only", "--entrypoint", "python", tags("cuda")[0], "-c", CUDA_CHECK], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--engine", choices=("podman", "docker"), default=None,
                        help="default: podman if installed, else docker if it runs, else podman from Debian (root)")
    parser.add_argument("--base", choices=("auto", "registry", "local"),
                        default=os.environ.get("TASN_IMAGE_BASE", "auto"),
                        help="pinned bases from the registry, local stand-ins, or registry falling back to stand-ins "
                             "(default auto; $TASN_IMAGE_BASE)")
    parser.add_argument("--if-possible", action="store_true",
                        help="where no engine can run (not root and none installed), say why and exit 0: "
                             "the image tests then skip with that reason (make test-image)")
    args = parser.parse_args(argv)
    try:
        engine = choose_engine(args.engine)
        env = engine_env(engine)
        res = run([engine, "info"], env=env, check=False, capture=True)
        if res.returncode != 0:
            sys.exit(f"error: {engine} cannot run here: {res.stderr.strip()[-500:]}")
    except SystemExit as exc:
        if not args.if_possible or not isinstance(exc.code, str):
            raise
        say(f"no image built: {exc.code.removeprefix('error: ')}")
        return 0
    needs = VARIANTS[args.variant].needs
    if needs:
        build(needs, engine, env, args.base)
    build(args.variant, engine, env, args.base)
    if args.variant == "cuda":
        check_cuda(engine, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
