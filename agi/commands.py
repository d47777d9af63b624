"""CLI commands of the AGI part: ``prepaid sounds install`` (the lead adds them to ``prepaid``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

DEFAULT_DIR = Path("/usr/share/asterisk/sounds/en")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "sounds"
FORMATS = (".wav", ".ulaw", ".alaw", ".gsm", ".sln", ".g722")


def install_sounds(source: Path, target: Path) -> list[Path]:
    """Copy every prompt of ``source`` to ``target/prepaid/<name>.<ext>`` (atomically each)."""
    files = sorted(p for p in source.iterdir() if p.suffix in FORMATS) if source.is_dir() else []
    if not files:
        raise click.ClickException(f"{source}: no prompts (*.wav, *.ulaw) to install; "
                                   "run 'make sounds' first")
    dest = target / "prepaid"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        copied = []
        for src in files:
            tmp = dest / f".{src.name}.tmp-{os.getpid()}"
            shutil.copyfile(src, tmp)
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
              default=SOURCE_DIR, show_default=True, help="Where the generated prompts are.")
def sounds_install(target: Path, source: Path) -> None:
    """Copy the prompts into Asterisk's sounds directory."""
    copied = install_sounds(source, target)
    names = sorted({p.stem for p in copied})
    click.echo(f"installed {len(names)} prompts ({len(copied)} files) in {target / 'prepaid'}")
