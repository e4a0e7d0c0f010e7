"""Every shipped YAML resolves through ``ppg fit --print_config`` (stacked where it is a fragment)."""

from pathlib import Path

import pytest

from ppg.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WHOLE = {"base.yaml", "experiment/demo.yaml", "experiment/smoke.yaml"}


def _stack(path: Path) -> list[Path]:
    """A whole config alone; a study file on the demo; any other fragment on base.yaml."""
    relative = path.relative_to(CONFIGS).as_posix()
    if relative in WHOLE:
        return [path]
    if relative.startswith("experiment/study/"):
        return [CONFIGS / "experiment" / "demo.yaml", path]
    return [CONFIGS / "base.yaml", path]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_resolves(path, capsys):
    args = ["fit"]
    for file in _stack(path):
        args += ["--config", str(file)]
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    assert "model:" in out and "data:" in out and "trainer:" in out


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_names_its_command(path):
    """Configs open with the command that runs them (or say which file they stack on)."""
    header = "\n".join(line for line in path.read_text().splitlines()[:12] if line.startswith("#"))
    assert "ppg " in header or "--config" in header, f"{path.name}: no command in the header comment"
