"""The generated prompts: every one the code plays exists in Asterisk-ready formats."""

from __future__ import annotations

import array
import ast
import wave
from pathlib import Path

from click.testing import CliRunner

from agi import decision, menu, speech
from agi.commands import PROMPTS, sounds, sounds_install
from prepaid.callrecord import WARNING_FILE

PLAYED = {decision.PROMPT_NO_CREDIT, decision.PROMPT_REFUSED, decision.PROMPT_LOW_BALANCE,
          WARNING_FILE, "prepaid/your-balance-is", "prepaid/account-unknown",
          "prepaid/and", "prepaid/cents", "prepaid/minus", speech.GENERIC_CURRENCY,
          *speech.CURRENCY_PROMPTS.values()}


def menu_prompts() -> set[str]:
    """Every prompt agi/menu.py names: the arguments of its _f() calls and its outcome
    prompts."""
    tree = ast.parse(Path(menu.__file__).read_text())
    names = {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "_f"
             for arg in node.args if isinstance(arg, ast.Constant)}
    return {str(n) for n in names} | set(menu.OUTCOME_PROMPTS.values())


def prompt_names() -> set[str]:
    lines = (PROMPTS / "prompts.txt").read_text().splitlines()
    return {ln.split("|", 1)[0] for ln in lines if ln and not ln.startswith("#")}


def test_every_played_prompt_is_in_prompts_txt() -> None:
    assert {p.removeprefix("prepaid/") for p in PLAYED} <= prompt_names()
    said = menu_prompts()
    assert {"enter-pin", "to-add", "confirm-or-cancel", "topup-done"} <= said
    assert said <= prompt_names(), sorted(said - prompt_names())


def test_each_prompt_is_8khz_mono_16bit_wav_and_ulaw_of_real_speech() -> None:
    for name in prompt_names():
        with wave.open(str(PROMPTS / f"{name}.wav")) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2), name
            frames = w.getnframes()
            audio = w.readframes(frames)
        assert frames > 4000, f"{name}: shorter than half a second"
        samples = array.array("h", audio)
        assert max(abs(x) for x in samples) > 16_000, f"{name}: not normalised speech"
        ulaw = (PROMPTS / f"{name}.ulaw").read_bytes()
        assert len(ulaw) == frames, name  # one byte a sample, same length


def test_sounds_install_copies_into_prepaid_subdirectory(tmp_path: Path) -> None:
    result = CliRunner().invoke(sounds, ["install", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    got = {p.name for p in (tmp_path / "prepaid").iterdir()}
    assert "balance-too-low.wav" in got and "balance-too-low.ulaw" in got
    assert len(got) == 2 * len(prompt_names())
    assert (tmp_path / "prepaid" / "cents.ulaw").read_bytes() == (
        PROMPTS / "cents.ulaw").read_bytes()


def test_sounds_install_without_prompts_names_the_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(sounds_install, ["--dir", str(tmp_path), "--from",
                                                 str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no prompts" in result.output and "none" in result.output
