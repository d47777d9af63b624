"""CLI commands of the AGI part: ``prepaid sounds install`` (the lead adds them to ``prepaid``)."""

from __future__ import annotations

import json
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePath

import click

DEFAULT_DIR = Path("/usr/share/asterisk/sounds/en")
# The package data agi.sounds (the top-level sounds/ of the checkout, see pyproject.toml).
PROMPTS: Traversable = resources.files("agi.sounds")
FORMATS = (".wav", ".ulaw", ".alaw", ".gsm", ".sln", ".g722")


def install_sounds(source: Traversable, target: Path) -> list[Path]:
    """Copy every prompt of ``source`` to ``target/prepaid/<name>.<ext>`` (atomically each)."""
    files = sorted((p for p in source.iterdir() if PurePath(p.name).suffix in FORMATS),
                   key=lambda p: p.name) if source.is_dir() else []
    if not files:
        raise click.ClickException(f"{source}: no prompts (*.wav, *.ulaw) to install; "
                                   "run 'make sounds' first")
    dest = target / "prepaid"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        copied = []
        for src in files:
            tmp = dest / f".{src.name}.tmp-{os.getpid()}"
            tmp.write_bytes(src.read_bytes())
            tmp.chmod(0o644)
            tmp.replace(dest / src.name)
            copied.append(dest / src.name)
    except OSError as exc:
        raise click.ClickException(f"{dest}: cannot install prompts: {exc.strerror}") from None
    return copied


@click.group("sounds")
def sounds() -> None:
    """The voice prompts (prepaid/<name>) Asterisk plays."""


@sounds.command("install")
@click.option("--dir", "target", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_DIR, show_default=True,
              help="Asterisk sounds directory for the language; prompts go to DIR/prepaid/.")
@click.option("--from", "source", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where the prompts are  [default: the installed package's]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def sounds_install(target: Path, source: Path | None, as_json: bool) -> None:
    """Copy the prompts into Asterisk's sounds directory."""
    copied = install_sounds(PROMPTS if source is None else source, target)
    names = sorted({p.stem for p in copied})
    if as_json:
        click.echo(json.dumps({"dir": str(target / "prepaid"), "prompts": names,
                               "files": [str(p) for p in copied]}, indent=2))
        return
    click.echo(f"installed {len(names)} prompts ({len(copied)} files) in {target / 'prepaid'}")
