"""Project hygiene (licence, citation, one version, py.typed, changelog, demo installs) and quiet output."""

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import genhancer
from genhancer.cli import main
from genhancer.modelcard import PAPER_TITLE

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_the_declared_apache_2():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text


def test_citation_cff_cites_the_project_and_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["title"] == PAPER_TITLE and paper["year"] == 2025
    assert [a["family-names"] for a in paper["authors"]] == ["Ma", "Ge", "Wang", "Guo", "Ge", "Shan"]
    assert "2503.19480" in paper["url"] and "version" not in cff  # the version lives in one place only


def test_version_is_defined_once(capsys):
    data = pyproject()
    assert "version" not in data["project"] and data["project"]["dynamic"] == ["version"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "genhancer.__version__"}
    found = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.*"), *(ROOT / "src").rglob("*.py")]
             if p.is_file() and re.search(rf"^\s*(__version__|version)\s*=\s*['\"]{re.escape(genhancer.__version__)}",
                                          p.read_text(errors="replace"), re.M)]
    assert found == ["src/genhancer/__init__.py"]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"genhancer {genhancer.__version__}"


def test_py_typed_and_changelog():
    assert (ROOT / "src" / "genhancer" / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["genhancer"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog") and "## Unreleased" in changelog
    assert f"## {genhancer.__version__}" in changelog


def test_the_demo_installs_no_test_extras():
    demo, tests = ((ROOT / "scripts" / name).read_text() for name in ("demo.sh", "test.sh"))
    assert re.search(r"^bash scripts/setup.sh(\s+#.*)?$", demo, re.M), "demo.sh must call setup.sh without extras"
    assert re.search(r"^bash scripts/setup.sh test$", tests, re.M)
    # setup.sh turns its arguments into the extras of the editable install
    script = (ROOT / "scripts" / "setup.sh").read_text()
    line = next(ln for ln in script.splitlines() if "pip install -q -e" in ln)
    for args, spec in (([], "."), (["test"], ".[test]"), (["test", "tensorboard"], ".[test,tensorboard]")):
        expanded = subprocess.run(["bash", "-c", 'extras=$(IFS=,; echo "$*"); echo ".${extras:+[$extras]}"', "_",
                                   *args], capture_output=True, text=True, check=True).stdout.strip()
        assert expanded == spec
    assert 'extras=$(IFS=,; echo "$*")' in script and '".${extras:+[$extras]}"' in line


def test_info_prints_no_transformers_token_id_warnings():
    proc = subprocess.run([sys.executable, "-m", "genhancer", "info", "--backbone", "openai-clip-vit-l-14-224",
                           "--denoiser", "flux-tiny"], capture_output=True, text=True, check=True)
    assert "427,616,513" in proc.stdout
    assert "token_id" not in proc.stderr and proc.stderr.strip() == "", proc.stderr


def test_a_stage2_run_prints_no_third_party_noise(tiny_clip, overrides, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main(["train", *overrides(tiny_clip, s1, steps=1)]) == 0
    proc = subprocess.run([sys.executable, "-m", "genhancer", "train", *overrides(
        tiny_clip, s2, stage="stage2", steps=1, stage__init_from=s1, train__precision="bf16")],
        capture_output=True, text=True, check=True)
    noise = ["is_gradient_checkpointing", "Mismatch dtype", "Setting accelerator", "falling back", "Falling back",
             "token_id", "Warning", "warn("]
    output = proc.stdout + proc.stderr
    assert not [n for n in noise if n in output], output
    assert "precision bf16" in proc.stdout and re.search(r"note +(CPU run in bf16|train.precision=bf16 on a CPU).*"
                                                         r"train.precision=fp32", proc.stdout)


@pytest.mark.parametrize("module, code, line", [
    ("torchvision", "from transformers import CLIPImageProcessor", "falling back to"),
    ("deepspeed", "import deepspeed", "Setting accelerator to CPU"),
])
def test_third_party_lines_are_silenced(module, code, line):
    installed = importlib.util.find_spec(module) is not None
    if installed == (module == "torchvision"):  # the fallback needs torchvision absent, DeepSpeed's line DeepSpeed
        pytest.skip(f"{module} is {'' if installed else 'not '}installed")

    def output(prefix: str) -> str:
        proc = subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, check=True)
        return proc.stdout + proc.stderr

    if line not in output(""):
        pytest.skip("this environment does not print the line")
    assert line not in output("from genhancer.quiet import silence_third_party; silence_third_party(); ")


def test_the_readme_states_the_shipped_bases_size():
    from transformers import CLIPModel

    from genhancer.miniworld.base import shipped_base

    model = CLIPModel.from_pretrained(shipped_base())
    width = model.config.vision_config.hidden_size
    stated = f"{sum(p.numel() for p in model.parameters()):,} parameters, ViT " \
             f"{model.config.vision_config.num_hidden_layers} x {width} on {model.config.vision_config.image_size} px"
    assert stated in " ".join((ROOT / "README.md").read_text().split())


def test_gpu_table_script_usage_and_budget(tmp_path):
    script = str(ROOT / "scripts" / "gpu_table.sh")
    bad = subprocess.run(["bash", script, "everything"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "usage: bash scripts/gpu_table.sh core|sweep|all"
    # with no time left every bench is skipped and said so; the log and the end line are still written
    env = {**os.environ, "BUDGET": "-1", "OUT": str(tmp_path), "PYTHON": sys.executable, "DEVICE": "cpu"}
    done = subprocess.run(["bash", script, "sweep"], capture_output=True, text=True, env=env, check=True)
    log = (tmp_path / "gpu.log").read_text()
    assert log.count("skipped (budget):") == 11 and "--resolution 224" in log and "--attention math" in log
    assert "done in" in done.stdout and not (tmp_path / "gpu.jsonl").exists()


def test_gpu_table_runs_again_with_cpu_drawn_weights_once_a_bench_fails(tmp_path):
    """The paper preset draws its weights on the GPU, untried there: after a failed bench the script retries it,
    and runs every later one, with model.init_on_device=false; a bench that fails anyway is said to have failed."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"  # stands in for the interpreter: fails every bench that draws on the device
    fake.write_text(f"""#!/usr/bin/env bash
[ "$1" = -c ] && exit 0
echo "$*" >> {calls}
case "$*" in *bench_denoiser*) exit 0 ;; *--attention*) exit 1 ;; *model.init_on_device=false*) exit 0 ;; *) exit 1 ;; esac
""")
    fake.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": str(fake), "DEVICE": "cpu", "PRESET": "paper"}
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_table.sh"), "all"], capture_output=True, text=True,
                   env=env, check=True)
    denoiser, *runs = calls.read_text().splitlines()
    assert denoiser.startswith("scripts/bench_denoiser.py")  # core first, then sweep: 7 + 11 benches
    assert len(runs) == 19 and "model.init_on_device=false" not in runs[0]  # the first one twice
    assert all(r.endswith("model.init_on_device=false") and "--preset paper --cpu" in r for r in runs[1:])
    assert "--stage stage1 --batch-size 2" in runs[0] and "--attention math" in runs[-1]
    log = (tmp_path / "gpu.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("failed:")] == ["failed: --batch-size 16 --attention math"]
