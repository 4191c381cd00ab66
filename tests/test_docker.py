"""The Docker images, built and run for real (`make docker-test` builds them first; .ci/run calls it).

Each image gets a converted copy of the embedded demo model as a read-only volume and must: run
`info` and `generate` with the same greedy text as this host, report the BLAS and threading
layer it promises, give one thread under `--cpus 1`, convert inside the container, and run as a
non-root user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import gptcpu
from checkpoints import ROOT

IMAGES = {  # tag -> what `gptcpu info --system` must report
    "gptcpu:openblas": ["backend openblas", "openblas", "layer omp"],
    "gptcpu:mkl": ["backend mkl", "mkl", "(gnu)", "layer omp"],
    "gptcpu:mkl-tbb": ["backend mkl", "(tbb)", "layer tbb"],
}


def _why_no_docker() -> str | None:
    if not os.environ.get("GPTCPU_DOCKER_TEST"):
        return "the images are built and run by `make docker-test` (GPTCPU_DOCKER_TEST is unset)"
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if r.returncode:
        return f"no Docker engine answers: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


pytestmark = pytest.mark.skipif(_why_no_docker() is not None, reason=str(_why_no_docker()))


def docker(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"docker {' '.join(map(str, args))}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    gptcpu.convert(str(ROOT / "engine" / "demo"), folder / "demo", dtype="f32", progress=False)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return folder


def run(image, models, *args, extra=()):
    return docker("run", "--rm", *extra, "-v", f"{models}:/models:ro", image, *args)


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_runs_info_and_generate(image, models):
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    print(f"{image}: {size / 1e6:.0f} MB")
    info = run(image, models, "info", "/models/demo", "--json")
    assert json.loads(info.stdout)["params"]["total"] == 1_350_400
    prompt = "def fib(n):"
    gen = run(image, models, "generate", "--model", "/models/demo", "--temperature", "0", "--max-new-tokens", "24",
              "--verbose", prompt)
    m = gptcpu.load(models / "demo")
    want = m.tokenizer.decode(list(m.generate(m.tokenizer.encode(prompt), 24)))
    assert gen.stdout == want + "\n"
    assert "decode" in gen.stderr


@pytest.mark.parametrize("image,expect", list(IMAGES.items()))
def test_image_reports_its_backend_and_follows_the_cpu_quota(image, expect, models):
    two = run(image, models, "info", "--system", extra=("--cpus", "2"))
    for e in expect:
        assert e in two.stdout, (e, two.stdout)
    one = run(image, models, "info", "--system", extra=("--cpus", "1"))
    pools = [line for line in one.stdout.splitlines() if " threads" in line]
    assert pools and all(": 1 threads" in line or ", 1 threads" in line for line in pools), one.stdout


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """The demo checkpoint in Hugging Face format, readable by the container's user."""
    folder = tmp_path_factory.mktemp("hf") / "demo"
    shutil.copytree(ROOT / "engine" / "demo", folder)
    for p in [folder.parent, folder, *folder.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return folder


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_is_non_root_and_converts_inside(image, hf_source):
    uid = docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
    assert uid != "0"
    r = docker("run", "--rm", "-v", f"{hf_source}:/src:ro", "--entrypoint", "sh", image, "-c",
               "gptcpu convert /src --out /tmp/m --dtype bf16 --quiet && "
               "gptcpu generate --model /tmp/m --seed 1 --max-new-tokens 8 'import os'")
    assert r.stdout.strip()
